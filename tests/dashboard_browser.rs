//! The dashboard in a real headless Chromium, driven over chromedriver's WebDriver API, the way
//! a person uses it: at 1280 px and at 390 px, with the keyboard, with reloads, back and
//! forward, through restarts of the runtime and of the gateway. Every test saves a screenshot
//! in `<temp>/wg-dashboard-screens/` for a person to look at.
//! Without Chromium these tests say they were skipped; under CI (CI=true) a missing browser fails.

mod common;

use std::path::{Path, PathBuf};

use common::browser::Driver;
use common::*;
use serde_json::{Value, json};

/// An embedded memory runtime `local` (label "This machine") whose workers queue many inputs.
fn page_config(extra: &str) -> String {
    format!(
        "[server]\nbind = \"127.0.0.1:0\"\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\n\
         label = \"This machine\"\nstore = \"memory\"\ninput_queue = 512\n\n[profiles.echo]\nkind = \"echo\"\n\n\
         [profiles.chatty]\nkind = \"echo\"\ndelay_ms = 60\n{extra}"
    )
}

fn create(base: &str, runtime: &str, body: Value) -> String {
    let created = post_json(&format!("{base}/api/runtimes/{runtime}/workers"), &body);
    assert_eq!(created.status, 201, "{:?}", created.body);
    created.body["worker"]["worker_id"].as_str().expect("a worker id").to_owned()
}

fn say(base: &str, runtime: &str, wid: &str, text: &str) {
    let sent = post_json(&format!("{base}/api/runtimes/{runtime}/workers/{wid}/input"), &json!({"content": text}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
}

/// Input straight to a runtime process, as another client of it would send it.
fn say_to_runtime(rt: &Process, wid: &str, text: &str) {
    let sent = post_json(&rt.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": text}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
}

/// The whole transcript's texts, page by page, as the gateway serves them.
fn transcript_texts(base: &str, wid: &str) -> Vec<String> {
    let mut texts = Vec::new();
    let mut start = Some(0);
    while let Some(at) = start {
        let page = get(&format!("{base}/api/runtimes/local/workers/{wid}/transcript?start={at}")).body;
        texts.extend(page["items"].as_array().unwrap().iter().map(|i| i["content"].as_str().unwrap().to_owned()));
        start = page["next_start"].as_u64();
    }
    texts
}

/// The texts of the conversation as the page shows it.
const MESSAGES: &str = "return [...document.querySelectorAll('#entries .msg .text')].map((e) => e.textContent)";

fn messages(driver: &Driver) -> Vec<String> {
    serde_json::from_value(driver.script(MESSAGES)).expect("texts")
}

fn wait_true(driver: &Driver, what: &str, condition: &str) {
    driver.wait_script(what, &format!("return !!({condition})"));
}

/// Error toasts shown now (info toasts, such as "deleted", are not errors).
fn error_toasts(driver: &Driver) -> Value {
    driver.script("return [...document.querySelectorAll('.toast:not(.info)')].map((t) => t.textContent)")
}

#[test]
fn a_person_creates_a_worker_talks_interrupts_stops_and_deletes_it_at_1280px() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-walk", &page_config(""));
    driver.open(&gw.url("/"));
    driver.wait_script("the runtime list", "return document.querySelectorAll('#profile option').length > 0");
    assert_eq!(driver.script("return location.hash"), "#/runtimes/local", "the URL names the runtime");
    assert_eq!(driver.script("return document.querySelector('link[rel=icon]') !== null"), true, "a favicon");
    driver.script("document.querySelector('#profile').value = 'chatty'; return true");
    driver.script("document.querySelector('#objective').value = 'Write a poem'; return true");
    driver.click("#create-btn");
    wait_true(&driver, "the worker view", "document.querySelector('#worker-title').textContent === 'Write a poem'");
    let wid = get(&gw.url("/api/runtimes/local/workers")).body["items"][0]["worker_id"].as_str().unwrap().to_owned();
    assert_eq!(driver.script("return location.hash"), format!("#/runtimes/local/workers/{wid}"));
    assert_eq!(driver.script("return document.title"), "Write a poem · This machine — worker-gateway");
    let sub = driver.script("return document.querySelector('#worker-sub').textContent").to_string();
    assert!(sub.contains("This machine (local)") && sub.contains(&wid) && sub.contains("created "), "{sub}");
    wait_true(&driver, "the input box", "!document.querySelector('#input').disabled");
    driver.click("#input");
    driver.keys("hello from a browser\u{E007}");
    // Live: the reply grows word by word before the turn ends.
    driver.wait_script(
        "partial output",
        "const b = document.querySelector('.msg.assistant .text'); return b && b.textContent.length > 0 && b.textContent !== 'hello from a browser'",
    );
    wait_true(&driver, "the working badge", "document.querySelector('#worker-status').textContent === 'working'");
    wait_true(
        &driver,
        "the whole reply",
        "document.querySelector('.msg.assistant .text')?.textContent === 'hello from a browser'",
    );
    wait_true(&driver, "the idle badge", "document.querySelector('#worker-status').textContent === 'idle'");
    assert_eq!(messages(&driver), ["hello from a browser", "hello from a browser"]);
    let stamp = driver.script("return document.querySelector('.msg.user time').textContent").to_string();
    assert!(stamp.len() >= 10 && stamp.contains(':'), "entries carry their time: {stamp}");
    // The list shows one state per worker and counts what the stream added.
    wait_true(
        &driver,
        "the entry count",
        "document.querySelector('#workers [role=option] .info').textContent.includes('2 entries')",
    );
    assert_eq!(driver.script("return document.querySelector('#workers [role=option] .state').textContent"), "idle");

    // Interrupt ends the running turn and the worker goes on.
    let long: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    say(&gw.base, "local", &wid, &long.join(" "));
    wait_true(&driver, "Interrupt enabled during a turn", "!document.querySelector('#interrupt').disabled");
    driver.click("#interrupt");
    // The transcript's own entry says so, live as after a reload (and once: no second note).
    wait_true(
        &driver,
        "the interrupted entry",
        "[...document.querySelectorAll('.msg.system .text')].some((e) => e.textContent === 'Turn 2 was interrupted.')",
    );
    wait_true(&driver, "Interrupt disabled when idle", "document.querySelector('#interrupt').disabled");
    assert_eq!(driver.script("return document.querySelector('#worker-status').textContent"), "idle");
    let notes = driver.script("return [...document.querySelectorAll('.note')].map((n) => n.textContent).join()");
    assert!(!notes.to_string().contains("turn 2"), "{notes}");
    driver.click("#input");
    driver.keys("still here\u{E007}\u{E007}");
    wait_true(
        &driver,
        "the next reply",
        "[...document.querySelectorAll('.msg.assistant .text')].some((b) => b.textContent === 'still here')",
    );

    let users = driver.script(
        "return [...document.querySelectorAll('.msg.user .text')].filter((e) => e.textContent === 'still here').length",
    );
    assert_eq!(users, 1, "a second Enter while the first is on its way sends nothing twice");

    // Stop while a turn runs: `stopping` until the turn ends, and no Delete before.
    assert_eq!(
        driver.script("return document.querySelector('#delete').disabled"),
        true,
        "a running worker can't be deleted"
    );
    let words: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    say(&gw.base, "local", &wid, &words.join(" "));
    wait_true(&driver, "the turn", "document.querySelector('#worker-status').textContent === 'working'");
    driver.click("#stop");
    wait_true(&driver, "the stopping badge", "document.querySelector('#worker-status').textContent === 'stopping'");
    assert_eq!(driver.script("return document.querySelector('#delete').disabled"), true, "not while the turn ends");
    wait_true(&driver, "the stopped badge", "document.querySelector('#worker-status').textContent === 'stopped'");
    wait_true(
        &driver,
        "the stopped row",
        "document.querySelector('#workers [role=option] .state').textContent === 'stopped'",
    );
    assert_eq!(driver.script("return document.querySelector('#input').disabled"), true);
    driver.screenshot("walkthrough-1280-stopped");
    driver.click("#delete");
    assert_eq!(driver.script("return document.querySelector('#delete').textContent"), "Delete for good?");
    assert_eq!(get(&gw.url("/api/runtimes/local/workers")).body["items"].as_array().unwrap().len(), 1, "not yet");
    driver.click("#delete");
    wait_true(&driver, "back at the runtime", "location.hash === '#/runtimes/local'");
    wait_true(&driver, "the empty list", "document.querySelector('#workers').textContent === 'no workers yet'");
    assert_eq!(driver.script("return document.activeElement.id"), "create-btn", "the focus lands somewhere useful");
    assert_eq!(get(&gw.url("/api/runtimes/local/workers")).body["items"], json!([]));
    assert_eq!(error_toasts(&driver), json!([]), "no error shown");
}

/// A reply cut short by Cancel is followed by the transcript's entry that says so, once (no
/// note besides), and the page shows the same entries in the same order as after a reload:
/// an input queued while the reply streamed sits before it, where the transcript has it, and
/// so does the entry that says Cancel dropped it.
#[test]
fn a_reply_cut_short_by_cancel_says_so_live_and_after_a_reload() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-cancel", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "chatty"}));
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the input box", "!document.querySelector('#input').disabled");
    let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
    say(&gw.base, "local", &wid, &words.join(" "));
    wait_true(
        &driver,
        "a reply under way",
        "document.querySelector('.msg.assistant .text')?.textContent.includes('w3 ')",
    );
    say(&gw.base, "local", &wid, "queued behind it");
    wait_true(&driver, "the queued input", "document.querySelectorAll('.msg.user').length === 2");
    driver.click("#cancel");
    wait_true(
        &driver,
        "the cut-short entry",
        "[...document.querySelectorAll('.msg.system .text')].some((e) => e.textContent === 'Turn 1 was cut short: the worker was cancelled.')",
    );
    wait_true(&driver, "the cancelled badge", "document.querySelector('#worker-status').textContent === 'cancelled'");
    let live = messages(&driver);
    assert_eq!(live, transcript_texts(&gw.base, &wid), "live, each entry once and in the transcript's order");
    assert_eq!(live.len(), 5, "the inputs, the queued one dropped, the reply so far, the note: {live:?}");
    assert_eq!(live[2], "1 queued input was not run: the worker was cancelled.");
    let notes = driver.script("return [...document.querySelectorAll('.note')].map((n) => n.textContent).join()");
    assert!(!notes.to_string().contains("turn 1"), "said once, by the entry: {notes}");
    driver.screenshot("cancel-cut-short");
    driver.script("location.reload(); return true");
    wait_true(&driver, "the reloaded log", "document.querySelectorAll('#entries .msg').length === 5");
    assert_eq!(messages(&driver), live, "a reload shows what the live page showed");
    assert_eq!(error_toasts(&driver), json!([]));
}

#[test]
fn a_deep_link_survives_reload_back_and_forward_and_earlier_entries_load_on_demand() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-link", &page_config(""));
    let long =
        create(&gw.base, "local", json!({"profile": "echo", "intent": {"kind": "task", "objective": "long talk"}}));
    for i in 0..150 {
        say(&gw.base, "local", &long, &format!("message {i}"));
    }
    wait_transcript(&gw.base, &long, 300);
    wait_turn_ended(&gw.base, "local", &long);
    let other =
        create(&gw.base, "local", json!({"profile": "echo", "intent": {"kind": "task", "objective": "second"}}));

    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{long}")));
    driver.wait_script("the newest page", "return document.querySelectorAll('#entries .msg').length === 256");
    assert_eq!(driver.script("return document.title"), "long talk · This machine — worker-gateway");
    assert_eq!(
        driver.script("return document.querySelector('#load-earlier').textContent"),
        "Load earlier entries (44 more)"
    );
    let shown = messages(&driver);
    assert_eq!((shown[0].as_str(), shown[255].as_str()), ("message 22", "message 149"));
    assert!(
        driver.script(
            "const l = document.querySelector('#log'); return l.scrollHeight - l.scrollTop - l.clientHeight < 40"
        ) == true
    );
    // The oldest entry shown stays where the reader sees it while earlier ones load above.
    driver.script("document.querySelector('#log').scrollTop = 200; return true");
    driver.click("#load-earlier");
    driver.wait_script("all 300 entries", "return document.querySelectorAll('#entries .msg').length === 300");
    assert_eq!(messages(&driver), transcript_texts(&gw.base, &long), "every entry once, in the transcript's order");
    assert_eq!(driver.script("return document.querySelector('#earlier').hidden"), true, "nothing earlier is left");
    assert!(
        driver.script("return document.querySelector('#log').scrollTop").as_f64().unwrap() > 1000.0,
        "the place is kept"
    );
    driver.screenshot("history-300");

    driver.click(&format!("#workers [data-key='{other}']"));
    wait_true(&driver, "the second worker", "document.querySelector('#worker-title').textContent === 'second'");
    assert_eq!(driver.script("return location.hash"), format!("#/runtimes/local/workers/{other}"));
    driver.call("POST", "/back", json!({}));
    wait_true(&driver, "back to the first", "document.querySelector('#worker-title').textContent === 'long talk'");
    driver.wait_script("its entries again", "return document.querySelectorAll('#entries .msg').length === 256");
    assert_eq!(
        driver.script("return document.querySelector(`#workers [data-key='${location.hash.split('/').pop()}']`).getAttribute('aria-selected')"),
        "true"
    );
    driver.call("POST", "/forward", json!({}));
    wait_true(&driver, "forward to the second", "document.querySelector('#worker-title').textContent === 'second'");
    driver.call("POST", "/refresh", json!({}));
    wait_true(&driver, "the second after a reload", "document.querySelector('#worker-title').textContent === 'second'");
    wait_true(&driver, "its stream", "document.querySelector('#stream').textContent === 'live'");
    assert_eq!(driver.script("return document.title"), "second · This machine — worker-gateway");
    assert_eq!(error_toasts(&driver), json!([]));
}

/// Every entry shows when it was recorded: a reply streamed live shows the moment it was
/// recorded (when it ended), as the same entry does after a reload, not when it began.
/// A very long entry shows its first 100 000 characters, and the rest when asked: a browser
/// took minutes to lay out a reply of megabytes, the tab frozen meanwhile. Streaming, a
/// long reply stops growing at that length until it ends.
#[test]
fn a_very_long_entry_shows_its_start_and_the_rest_when_asked() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-long", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "echo"}));
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    let long = "long words ".repeat(30_000);
    say(&gw.base, "local", &wid, long.trim());
    wait_turn_ended(&gw.base, "local", &wid);
    let chars = long.trim().len();
    wait_true(
        &driver,
        "both entries cut short",
        &format!(
            "[...document.querySelectorAll('#entries .msg .text')].filter((t) => t.querySelector('button.more')?.textContent === '… show all {chars} characters').length === 2"
        ),
    );
    let shown =
        driver.script("return document.querySelector('#entries .msg.assistant .text').firstChild.textContent.length");
    assert_eq!(shown, json!(100_000));
    driver.script("document.querySelector('#entries .msg.assistant button.more').click(); return null");
    let all = driver.script("return document.querySelector('#entries .msg.assistant .text').textContent.length");
    assert_eq!(all, json!(chars), "the whole reply when asked");
}

#[test]
fn a_streamed_reply_shows_when_it_was_recorded_live_and_after_a_reload() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-times", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "chatty"}));
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    let words = "w ".repeat(30);
    say(&gw.base, "local", &wid, words.trim());
    wait_turn_ended(&gw.base, "local", &wid);
    wait_true(
        &driver,
        "the whole reply",
        &format!("document.querySelectorAll('#entries .msg .text')[1]?.textContent === {:?}", words.trim()),
    );
    let recorded = "return document.querySelectorAll('#entries .msg time')[1].dateTime";
    let live = driver.script(recorded);
    driver.call("POST", "/refresh", json!({}));
    wait_true(&driver, "the reply after a reload", "document.querySelectorAll('#entries .msg').length === 2");
    let reloaded = driver.script(recorded);
    let apart = driver.script(&format!("return Math.abs(Date.parse({live}) - Date.parse({reloaded}))"));
    assert!(apart.as_f64().is_some_and(|ms| ms < 1000.0), "live {live}, after a reload {reloaded}: {apart} ms apart");
}

#[test]
fn the_lists_keep_keyboard_focus_across_refreshes_and_space_selects() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-focus", &page_config(""));
    let ids: Vec<String> = (0..3).map(|_| create(&gw.base, "local", json!({"profile": "echo"}))).collect();
    driver.open(&gw.url("/"));
    driver.wait_script("three workers", "return document.querySelectorAll('#workers [role=option]').length === 3");
    assert_eq!(driver.script("return document.querySelector('#workers').getAttribute('role')"), "listbox");
    driver.script("document.querySelector('#workers [role=option]').focus(); return true");
    driver.keys("\u{E015}"); // ↓
    let focused = driver.script("const a = document.activeElement; a.probe = 'kept'; return a.dataset.key");
    assert_eq!(focused, json!(ids[1]), "↓ moves to the next worker");
    // Two refreshes later the same element still has the focus, and counts have caught up.
    say(&gw.base, "local", &ids[2], "counted");
    let before = driver.script("return document.querySelector('#summary').textContent");
    for _ in 0..2 {
        let seen = driver.script("return document.querySelector('#summary').textContent");
        driver.wait_script("a refresh", &format!("return document.querySelector('#summary').textContent !== {seen}"));
    }
    assert_ne!(before, driver.script("return document.querySelector('#summary').textContent"));
    assert_eq!(driver.script("return document.activeElement.probe === 'kept'"), true, "focus survives refreshes");
    wait_true(
        &driver,
        "the new count",
        &format!(
            "document.querySelector(\"#workers [data-key='{}'] .info\").textContent.includes('2 entries')",
            ids[2]
        ),
    );
    driver.keys(" ");
    wait_true(&driver, "Space opens the focused worker", &format!("location.hash.endsWith('{}')", ids[1]));
    assert_eq!(driver.script("return document.activeElement.getAttribute('aria-selected')"), "true");
    assert_eq!(driver.script("return document.activeElement.tabIndex"), 0, "the selected option is the tab stop");
    driver.screenshot("keyboard-focus");
}

#[test]
fn on_a_390px_screen_a_chosen_worker_fills_the_screen_and_back_returns_to_the_list() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(390, 844);
    let gw = TestGateway::start("dash-narrow", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "echo", "intent": {"kind": "task", "objective": "phone"}}));
    say(&gw.base, "local", &wid, "small screen");
    wait_transcript(&gw.base, &wid, 2);
    wait_turn_ended(&gw.base, "local", &wid);
    driver.open(&gw.url("/"));
    driver.wait_script("the worker row", "return document.querySelectorAll('#workers [role=option]').length === 1");
    assert_eq!(driver.script("return document.querySelector('#pane').offsetParent === null"), true);
    driver.click("#workers [role=option]");
    wait_true(&driver, "the conversation", "document.querySelectorAll('#entries .msg').length === 2");
    let visible = "const r = document.querySelector('#log').getBoundingClientRect(); \
                   return r.top >= 0 && r.top < innerHeight && r.width > 300";
    assert_eq!(driver.script(visible), true, "the conversation is on screen");
    assert_eq!(
        driver.script("return document.querySelector('#nav').offsetParent === null"),
        true,
        "the list steps aside"
    );
    assert_eq!(
        driver.script("return document.documentElement.scrollWidth <= innerWidth"),
        true,
        "no sideways scrolling"
    );
    driver.screenshot("narrow-390-worker");
    let composer = "const r = document.querySelector('#send').getBoundingClientRect(); return r.bottom <= innerHeight";
    assert_eq!(driver.script(composer), true, "Send is reachable without scrolling");
    driver.click("#back");
    wait_true(&driver, "the list again", "document.querySelector('#nav').offsetParent !== null");
    assert_eq!(
        driver.script("return document.querySelector('#workers [role=option]').getAttribute('aria-selected')"),
        "false",
        "no worker is shown, none is selected"
    );
    assert_eq!(driver.script("return location.hash"), "#/runtimes/local");
    driver.screenshot("narrow-390-list");
}

#[test]
fn errors_make_one_dismissible_toast_each_a_token_is_asked_for_and_offline_is_shown() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let dir = temp_dir("dash-toasts");
    let token_file = dir.join("browser-token");
    std::fs::write(&token_file, "let-me-in").unwrap();
    let rt = Process::start(&["runtime", "--memory", "--bind", "127.0.0.1:0"]);
    let remote = format!(
        "[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nlabel = \"Lab box\"\nbase_url = \"{}\"\nprobe_interval_ms = 200\n",
        rt.base
    );
    let config =
        page_config(&remote).replace("[server]\n", &format!("[server]\ntoken_file = \"{}\"\n", token_file.display()));
    let config = write_config("dash-toasts", &config);
    let mut gw = Process::start(&["serve", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"]);
    driver.open(&gw.url("/#/runtimes/lab"));
    wait_true(&driver, "the token toast", "document.querySelector(\".toast[data-key='unauthorized']\")");
    assert_eq!(
        driver.script("return document.querySelector('#create-btn').disabled"),
        true,
        "nothing to create on yet"
    );
    let placeholder = driver.script("return document.querySelector('#runtimes').textContent").to_string();
    assert!(placeholder.contains("token"), "the empty list says why: {placeholder}");
    assert_eq!(driver.script("return document.querySelector('#token').getAttribute('aria-invalid')"), "true");
    driver.click(".toast[data-key='unauthorized'] button");
    assert_eq!(driver.script("return document.activeElement.id"), "token", "the toast leads to the token box");
    driver.keys("let-me-in\u{E007}");
    wait_true(&driver, "the runtimes", "document.querySelectorAll('#runtimes [role=option]').length === 2");
    wait_true(&driver, "no token toast", "!document.querySelector('.toast')");
    assert_eq!(driver.script("return location.hash"), "#/runtimes/lab", "the deep link was kept");

    // A worker on the remote runtime, then the runtime goes away: three failed Stops, one toast.
    let auth = [("authorization", "Bearer let-me-in")];
    let created = agent()
        .post(&gw.url("/api/runtimes/lab/workers"))
        .header("authorization", "Bearer let-me-in")
        .header("content-type", "application/json")
        .send(json!({"profile": "echo"}).to_string())
        .expect("create");
    assert_eq!(created.status(), 201);
    let wid = wait_for("the worker in the list", std::time::Duration::from_secs(10), || {
        let list = request("GET", &gw.url("/api/runtimes/lab/workers"), &auth).body;
        list["items"][0]["worker_id"].as_str().map(str::to_owned)
    });
    let row = format!("#workers [data-key='{wid}']");
    wait_true(&driver, "the worker row", &format!("document.querySelector(\"{row}\")"));
    driver.click(&row);
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    drop(rt);
    for _ in 0..3 {
        wait_true(&driver, "Stop enabled", "!document.querySelector('#stop').disabled");
        driver.click("#stop");
        driver.wait_script("a failure", "return document.querySelector('.toast:not(.info)')?.textContent");
    }
    driver.wait_script("the count", "return document.querySelector('.toast .count').textContent === '×3'");
    assert_eq!(driver.script("return document.querySelectorAll('.toast').length"), 1, "one toast for one problem");
    assert!(error_toasts(&driver).to_string().contains("remote_runtime_unreachable"), "{}", error_toasts(&driver));
    // The Send button is not covered by it.
    let clear = "const t = document.querySelector('.toast').getBoundingClientRect(); \
                 const s = document.querySelector('#send').getBoundingClientRect(); \
                 return t.bottom <= s.top || t.top >= s.bottom || t.right <= s.left || t.left >= s.right";
    assert_eq!(driver.script(clear), true);
    wait_true(
        &driver,
        "the runtime's state",
        "document.querySelector(\"#runtimes [data-key='lab'] .health\").textContent === 'unreachable'",
    );
    let card = driver.script("return document.querySelector(\"#runtimes [data-key='lab'] .info\").textContent");
    assert!(card.to_string().contains("connection refused"), "the card says why the runtime is down: {card}");
    driver.screenshot("toast-dedup");
    driver.keys("\u{E00C}"); // Escape
    assert_eq!(driver.script("return document.querySelectorAll('.toast').length"), 0, "Escape dismisses it");

    // The gateway goes away: the page says it is offline and what it shows is last known.
    gw.signal(libc::SIGKILL);
    gw.wait(std::time::Duration::from_secs(10));
    wait_true(&driver, "the offline banner", "!document.querySelector('#offline').hidden");
    assert_eq!(driver.script("return document.querySelector('#nav').classList.contains('stale')"), true);
    assert_eq!(driver.script("return document.querySelector('#worker-status').classList.contains('stale')"), true);
    assert_eq!(driver.script("return document.querySelector('#summary').textContent"), "offline");
    assert_eq!(driver.script("return document.querySelectorAll('.toast').length"), 0, "no pile of network toasts");
    let idle = "return ['stop', 'cancel', 'send', 'create-btn'].every((id) => document.getElementById(id).disabled)";
    assert_eq!(driver.script(idle), true, "nothing is offered that could not reach the gateway");
    driver.screenshot("offline");
}

/// A link to a worker opened without the gateway's token says it waits for the token (not
/// that the connection was lost, nor that there are no workers), offers nothing to do, and
/// opens the worker once the token is given.
#[test]
fn a_worker_link_opened_without_the_token_waits_for_it_and_then_opens_the_worker() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let token_file = temp_dir("dash-locked").join("browser-token");
    std::fs::write(&token_file, "let-me-in").unwrap();
    let config =
        page_config("").replace("[server]\n", &format!("[server]\ntoken_file = \"{}\"\n", token_file.display()));
    let gw = TestGateway::start("dash-locked", &config);
    let auth = [("authorization", "Bearer let-me-in"), ("content-type", "application/json")];
    let send = |path: &str, body: Value| {
        let mut call = agent().post(&gw.url(path));
        for (name, value) in auth {
            call = call.header(name, value);
        }
        call.send(body.to_string()).expect("a call").status().as_u16()
    };
    let created = agent()
        .post(&gw.url("/api/runtimes/local/workers"))
        .header("authorization", "Bearer let-me-in")
        .header("content-type", "application/json")
        .send(json!({"profile": "echo"}).to_string())
        .expect("create")
        .body_mut()
        .read_json::<Value>()
        .expect("json");
    let wid = created["worker"]["worker_id"].as_str().expect("an id").to_owned();
    assert_eq!(send(&format!("/api/runtimes/local/workers/{wid}/input"), json!({"content": "behind a token"})), 200);

    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the token toast", "document.querySelector(\".toast[data-key='unauthorized']\")");
    driver.wait_script(
        "the stream waiting for the token",
        "return document.querySelector('#stream').textContent === \"waiting for the gateway's token\"",
    );
    assert_eq!(driver.script("return document.querySelector('#summary').textContent"), "needs a token");
    let workers = driver.script("return document.querySelector('#workers').textContent").to_string();
    assert!(workers.contains("token"), "the workers list says why it is empty: {workers}");
    let idle = "return ['interrupt','stop','cancel','send','input','delete'].every((id) => document.getElementById(id).disabled)";
    assert_eq!(driver.script(idle), true, "nothing is offered that the gateway would refuse");
    assert!(!notes(&driver).contains("lost the connection"), "a refusal is not a lost connection: {}", notes(&driver));
    assert_eq!(
        driver.script("return document.querySelector('#worker-status').textContent"),
        "",
        "no state it could not read"
    );
    driver.screenshot("worker-link-without-token");

    driver.click(".toast[data-key='unauthorized'] button");
    driver.keys("let-me-in\u{E007}");
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    wait_true(&driver, "the conversation", "document.querySelectorAll('#entries .msg').length === 2");
    assert_eq!(messages(&driver), ["behind a token", "behind a token"]);
    wait_true(&driver, "Send enabled", "!document.querySelector('#send').disabled");
    assert!(!notes(&driver).contains("lost the connection"), "{}", notes(&driver));
}

/// A `worker-gateway runtime` on a fixed port, so it can come back on the same address.
fn runtime_on(port: u16, args: &[&str]) -> Process {
    let bind = format!("127.0.0.1:{port}");
    let mut all = vec!["runtime", "--bind", bind.as_str()];
    all.extend_from_slice(args);
    Process::start(&all)
}

fn remote_config(port: u16, extra_server: &str) -> String {
    format!(
        "[server]\nbind = \"127.0.0.1:0\"\n{extra_server}\n[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\n\
         label = \"Lab box\"\nbase_url = \"http://127.0.0.1:{port}\"\nprobe_interval_ms = 200\n"
    )
}

fn notes(driver: &Driver) -> String {
    driver.script("return [...document.querySelectorAll('.note')].map((n) => n.textContent).join('\\n')").to_string()
}

/// An fs runtime on a fixed port (to start it again there, [`FsLab::runtime`]) behind a
/// gateway as `lab`, with a task worker "the first" that was told `said` and answered.
struct FsLab {
    rt: Process,
    data: PathBuf,
    port: u16,
    gw: TestGateway,
    wid: String,
}

impl FsLab {
    fn start(name: &str, said: &str) -> FsLab {
        let port = free_port();
        let data = temp_dir(name).join("data");
        let rt = runtime_on(port, &["--data-dir", data.to_str().unwrap()]);
        let gw = TestGateway::start(name, &remote_config(port, ""));
        wait_health(&gw.base, "lab", "healthy");
        let wid = create(&gw.base, "lab", json!({"intent": {"kind": "task", "objective": "the first"}}));
        say(&gw.base, "lab", &wid, said);
        wait_transcript_on(&gw.base, "lab", &wid, 2);
        wait_turn_ended(&gw.base, "lab", &wid);
        FsLab { rt, data, port, gw, wid }
    }

    /// Stops the runtime, does `meanwhile` to its data dir, and starts it again there.
    fn restart(&mut self, meanwhile: impl FnOnce(&Path)) -> &Process {
        self.rt.signal(libc::SIGKILL);
        self.rt.wait(std::time::Duration::from_secs(10));
        meanwhile(&self.data);
        self.rt = runtime_on(self.port, &["--data-dir", self.data.to_str().unwrap()]);
        &self.rt
    }
}

#[test]
fn a_worker_whose_runtime_came_back_without_it_shows_as_gone_with_its_notes() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let mut lab = FsLab::start("dash-wiped", "remember me");
    let wid = lab.wid.clone();
    driver.open(&lab.gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the conversation", "document.querySelectorAll('#entries .msg').length === 2");

    // The runtime dies, its store is wiped, and it comes back: the same id names a new worker.
    let rt = lab.restart(|data| std::fs::remove_dir_all(data).expect("wipe the store"));
    let impostor =
        json!({"intent": {"kind": "task", "objective": "an impostor"}, "profile": {"kind": "runtime_default"}});
    let created = post_json(&rt.url("/v1/workers"), &impostor);
    assert_eq!(created.body["worker"]["worker_id"], json!(wid), "the wiped store hands out the id again");
    say_to_runtime(rt, &wid, "not yours");
    driver.wait_script(
        "the gone state",
        "return document.querySelector('#stream').textContent === 'this worker no longer exists'",
    );
    let disabled = "return ['interrupt','stop','cancel','send','input','delete'].every((id) => document.getElementById(id).disabled)";
    assert_eq!(driver.script(disabled), true, "nothing acts on a worker that is gone");
    assert_eq!(driver.script("return document.querySelector('#worker-title').textContent"), "the first (gone)");
    let shown = messages(&driver);
    assert_eq!(shown, ["remember me", "remember me"], "the old conversation stays; the new worker's never shows");
    let notes = notes(&driver);
    assert!(notes.contains("reconnecting") || notes.contains("reset"), "the stream's story is visible: {notes}");
    assert!(notes.contains("no longer") || notes.contains("another worker"), "{notes}");
    driver.screenshot("gone-after-wipe");
}

/// A runtime started again on a restored copy of its data (its `store_id` deleted, as the
/// README asks) ends the streams open across the restore; the page then asks for the worker
/// and, finding the same one, shows it afresh as the runtime has it now. It showed `gone`,
/// every button disabled, while the worker was there and listed.
#[test]
fn a_worker_whose_runtime_came_back_from_a_restored_copy_is_shown_again() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let mut lab = FsLab::start("dash-restored", "backed up");
    let (base, wid) = (lab.gw.base.clone(), lab.wid.clone());
    let backup = lab.data.with_file_name("backup");
    let copied = std::process::Command::new("cp").arg("-a").arg(&lab.data).arg(&backup).status().expect("cp");
    assert!(copied.success(), "the backup");
    say(&base, "lab", &wid, "after the backup");
    wait_transcript_on(&base, "lab", &wid, 4);
    wait_turn_ended(&base, "lab", &wid);
    driver.open(&lab.gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the conversation", "document.querySelectorAll('#entries .msg').length === 4");

    // The runtime stops, its data is restored from the backup, `store_id` deleted, and it
    // starts again.
    lab.restart(|data| {
        std::fs::remove_dir_all(data).expect("the lost data");
        std::fs::rename(&backup, data).expect("restore");
        std::fs::remove_file(data.join("store_id")).expect("store_id deleted");
    });
    wait_true(
        &driver,
        "the restore noted",
        "[...document.querySelectorAll('.note')].some((n) => n.textContent.includes('still with this worker'))",
    );
    wait_true(&driver, "the stream live again", "document.querySelector('#stream').textContent === 'live'");
    assert_eq!(messages(&driver), ["backed up", "backed up"], "the worker as the runtime has it now");
    assert_eq!(driver.script("return document.querySelector('#worker-title').textContent"), "the first");
    assert_eq!(driver.script("return document.getElementById('send').disabled"), false, "it can be talked to");
    say(&base, "lab", &wid, "still here");
    wait_true(&driver, "the next reply", "document.querySelectorAll('#entries .msg').length === 4");
    driver.screenshot("restored-copy");
}

/// A reply that was streaming when its worker went away (a `memory` runtime restarted) is
/// marked as cut off, not left to look whole.
#[test]
fn a_reply_cut_off_by_its_worker_going_away_is_marked() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let port = free_port();
    let config = temp_dir("dash-cut-off").join("runtime.toml");
    let profile = "[runtime]\nid = \"rt\"\nstore = \"memory\"\n[profiles.chatty]\nkind = \"echo\"\ndelay_ms = 60\n";
    std::fs::write(&config, profile).expect("runtime config");
    let bind = format!("127.0.0.1:{port}");
    let start = || Process::start(&["runtime", "--config", config.to_str().unwrap(), "--bind", &bind]);
    let rt = start();
    let gw = TestGateway::start("dash-cut-off", &remote_config(port, ""));
    wait_health(&gw.base, "lab", "healthy");
    let wid = create(&gw.base, "lab", json!({"profile": "chatty"}));
    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    let words: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    say(&gw.base, "lab", &wid, &words.join(" "));
    wait_true(
        &driver,
        "the reply streaming",
        "document.querySelector('.msg.assistant .text')?.textContent.includes('c3')",
    );
    drop(rt);
    let _rt = start();
    wait_true(
        &driver,
        "the gone state",
        "document.querySelector('#stream').textContent === 'this worker no longer exists'",
    );
    let reply = driver.script("return document.querySelector('.msg.assistant .text').textContent").to_string();
    assert!(reply.contains("c3") && reply.ends_with("[cut off: the worker is gone]\""), "{reply}");
}

/// Waits until worker `wid` has no turn under way: its last reply is in the transcript a
/// moment before its turn ends, and a page opened in between shows that reply as under way.
fn wait_turn_ended(base: &str, runtime: &str, wid: &str) {
    wait_for("the last turn to end", std::time::Duration::from_secs(20), || {
        let w = get(&format!("{base}/api/runtimes/{runtime}/workers/{wid}")).body;
        (w["activity"] == "idle").then_some(())
    });
}

fn wait_idle_on_runtime(rt: &Process, wid: &str, entries: u64) {
    wait_for("the runtime to finish", std::time::Duration::from_secs(20), || {
        let w = get(&rt.url(&format!("/v1/workers/{wid}"))).body;
        (w["worker"]["activity"] == "idle" && w["worker"]["transcript_len"].as_u64() >= Some(entries)).then_some(())
    });
}

/// A `worker-gateway runtime` with the memory store, `extra` appended to its `[runtime]`.
fn memory_runtime(dir: &Path, extra: &str) -> Process {
    let config = dir.join("runtime.toml");
    std::fs::write(&config, format!("[runtime]\nid = \"rt\"\nstore = \"memory\"\n{extra}")).expect("runtime config");
    Process::start(&["runtime", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"])
}

fn serve(config: &Path, port: u16) -> Process {
    let bind = format!("127.0.0.1:{port}");
    Process::start(&["serve", "--config", config.to_str().unwrap(), "--bind", &bind])
}

/// A memory runtime (`runtime_extra` in its `[runtime]`) and, in front of it as `lab`, a
/// healthy gateway on a fixed port (`server_extra` in its `[server]`): with its config and
/// port, to start it again on the same address.
fn runtime_and_gateway(name: &str, runtime_extra: &str, server_extra: &str) -> (Process, PathBuf, u16, Process) {
    let dir = temp_dir(name);
    let rt = memory_runtime(&dir, runtime_extra);
    let rt_port: u16 = rt.host_port().rsplit(':').next().unwrap().parse().unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, remote_config(rt_port, server_extra)).unwrap();
    let port = free_port();
    let gateway = serve(&config, port);
    wait_health(&gateway.base, "lab", "healthy");
    (rt, config, port, gateway)
}

#[test]
fn events_lost_while_the_gateway_was_down_are_noted_and_the_log_is_whole_again() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let (rt, config, port, gateway) = runtime_and_gateway(
        "dash-gap",
        "retained_events = 8\n\n[profiles.echo]\nkind = \"echo\"\n",
        "event_ring = 8\n",
    );
    let wid = create(&gateway.base, "lab", json!({"profile": "echo"}));
    say(&gateway.base, "lab", &wid, "before");
    wait_transcript_on(&gateway.base, "lab", &wid, 2);
    wait_turn_ended(&gateway.base, "lab", &wid);
    driver.open(&gateway.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the conversation", "document.querySelectorAll('#entries .msg').length === 2");
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");

    // The gateway dies; the worker goes on talking, past what the runtime retains.
    drop(gateway);
    for i in 0..6 {
        say_to_runtime(&rt, &wid, &format!("while you were away {i}"));
    }
    wait_idle_on_runtime(&rt, &wid, 14);
    wait_true(&driver, "the page noticing", "document.querySelector('#stream').textContent === 'reconnecting…'");
    let gateway = serve(&config, port);
    wait_health(&gateway.base, "lab", "healthy");
    // The list's refresh may fill the log from the transcript before the stream's gap comes.
    wait_true(
        &driver,
        "the gap noted",
        "[...document.querySelectorAll('.note')].some((n) => n.textContent.includes('could not be delivered'))",
    );
    driver.wait_script("the whole log", "return document.querySelectorAll('#entries .msg').length === 14");
    wait_true(&driver, "live again", "document.querySelector('#stream').textContent === 'live'");
    let notes = notes(&driver);
    assert!(notes.contains("could not be delivered"), "the gap is said and stays visible: {notes}");
    let page = get(&rt.url(&format!("/v1/workers/{wid}/transcript"))).body;
    let expected: Vec<&str> =
        page["transcript"]["items"].as_array().unwrap().iter().map(|i| i["content"].as_str().unwrap()).collect();
    assert_eq!(expected.len(), 14);
    assert_eq!(messages(&driver), expected, "after the gap the page shows the whole transcript, in order");
    driver.screenshot("gap-noted");
}

/// A reply that ends while the gateway is down, its end replayed when the gateway is back,
/// shows when it was recorded (as after a reload), not when the page got its end.
#[test]
fn a_reply_that_ended_while_the_gateway_was_down_shows_when_it_was_recorded() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let (rt, config, port, gateway) =
        runtime_and_gateway("dash-late-times", "\n[profiles.chatty]\nkind = \"echo\"\ndelay_ms = 50\n", "");
    let wid = create(&gateway.base, "lab", json!({"profile": "chatty"}));
    driver.open(&gateway.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    say(&gateway.base, "lab", &wid, &"w ".repeat(40));
    wait_true(&driver, "the reply streaming", "document.querySelectorAll('#entries .msg.assistant').length === 1");

    drop(gateway);
    wait_idle_on_runtime(&rt, &wid, 2);
    let gateway = serve(&config, port);
    wait_health(&gateway.base, "lab", "healthy");
    wait_true(&driver, "live again", "document.querySelector('#stream').textContent === 'live'");
    let page = get(&rt.url(&format!("/v1/workers/{wid}/transcript"))).body;
    let recorded: Vec<&str> =
        page["transcript"]["items"].as_array().unwrap().iter().map(|i| i["at"].as_str().unwrap()).collect();
    let shown = "return [...document.querySelectorAll('#entries .msg time')].map((t) => t.dateTime)";
    driver.wait_script("the reply's time", &format!("return {}.length === 2", &shown[7..]));
    assert_eq!(driver.script(shown), json!(recorded), "the page's times are the transcript's");
    driver.screenshot("late-reply-time");
}

#[test]
fn delete_asks_again_for_each_worker_and_links_that_name_nothing_are_refused() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-delete", &page_config(""));
    let first = create(&gw.base, "local", json!({"intent": {"kind": "task", "objective": "first"}}));
    let second = create(&gw.base, "local", json!({"intent": {"kind": "task", "objective": "second"}}));
    for wid in [&first, &second] {
        assert_eq!(post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/stop")), &json!({})).status, 200);
    }
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{first}")));
    wait_true(&driver, "Delete enabled", "!document.querySelector('#delete').disabled");
    driver.click("#delete");
    assert_eq!(driver.script("return document.querySelector('#delete').textContent"), "Delete for good?");
    driver.click(&format!("#workers [data-key='{second}']"));
    wait_true(&driver, "the second worker", "document.querySelector('#worker-title').textContent === 'second'");
    assert_eq!(driver.script("return document.querySelector('#delete').textContent"), "Delete", "disarmed");
    driver.click("#delete");
    assert_eq!(
        get(&gw.url("/api/runtimes/local/workers")).body["items"].as_array().unwrap().len(),
        2,
        "one click deletes nothing"
    );

    // Links with malformed or invalid ids: said, and the page goes on working.
    for bad in
        ["#/runtimes/%/workers/x", "#/runtimes/local/workers/%E0%A4%A", "#/runtimes/local/workers/..", "#/nonsense"]
    {
        driver.open(&gw.url(&format!("/{bad}")));
        wait_true(&driver, "the invalid-link toast", "document.querySelector(\".toast[data-key='invalid-link']\")");
        wait_true(&driver, "the runtimes", "document.querySelectorAll('#runtimes [role=option]').length === 1");
        wait_true(&driver, "a sane address", "location.hash === '#/runtimes/local'");
        assert_eq!(
            driver.script("return document.querySelector('#worker-title').textContent"),
            "No worker selected",
            "{bad}"
        );
    }
    driver.click(".toast[data-key='invalid-link'] button[aria-label=Dismiss]");
    assert_eq!(driver.script("return document.querySelectorAll('.toast').length"), 0, "dismissed by hand");
    // A link to a worker that does not exist shows it as gone, not as a live-looking worker.
    driver.open(&gw.url("/#/runtimes/local/workers/worker-ffffffff-000000ff"));
    wait_true(&driver, "the gone state", "document.querySelector('#stream').textContent === 'no such worker'");
    assert_eq!(driver.script("return document.querySelector('#send').disabled"), true);
    assert!(driver.script("return document.title").to_string().contains("(not found)"));
    assert_eq!(driver.script("return document.querySelector('#worker-status').textContent"), "missing");
    // A link to a runtime this gateway does not have says so, not that it failed "now".
    driver.open(&gw.url("/#/runtimes/nope/workers/worker-00000001"));
    wait_true(&driver, "the missing runtime", "document.querySelector('#stream').textContent === 'no such runtime'");
    wait_true(
        &driver,
        "the list's reason",
        "document.querySelector('#workers-error').textContent === \"there is no runtime nope in this gateway's configuration\"",
    );
    // A malformed link from there leads back to a runtime that exists, not to that one.
    driver.open(&gw.url("/#/nonsense"));
    wait_true(&driver, "a runtime that exists", "location.hash === '#/runtimes/local'");
}

#[test]
fn a_slow_runtime_is_not_an_offline_gateway_and_a_reply_under_way_says_its_start_is_missing() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let rt = memory_runtime(&temp_dir("dash-slow"), "\n[profiles.chatty]\nkind = \"echo\"\ndelay_ms = 60\n");
    let remote =
        format!("[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\nwrite_timeout_ms = 1500\n", rt.base);
    let gw = TestGateway::start("dash-slow", &page_config(&remote));
    wait_health(&gw.base, "lab", "healthy");
    let wid = create(&gw.base, "lab", json!({"profile": "chatty"}));
    let words: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    say(&gw.base, "lab", &wid, &words.join(" "));
    // Opened while the reply streams: the part before the page came is marked as missing...
    wait_for("the reply to start", std::time::Duration::from_secs(10), || {
        let w = get(&gw.url(&format!("/api/runtimes/lab/workers/{wid}"))).body;
        (w["activity"] == "busy").then_some(())
    });
    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the marked bubble", "document.querySelector('.msg.assistant .partial')");
    // ...and the whole reply is there when the turn ends.
    let whole = words.join(" ");
    wait_true(
        &driver,
        "the whole reply",
        &format!("document.querySelector('.msg.assistant .text').textContent === '{whole}'"),
    );

    // The runtime stops answering: the action says so; the gateway is not called offline.
    rt.signal(libc::SIGSTOP);
    driver.click("#stop");
    driver.wait_script("the timeout", "return document.querySelector(\".toast[data-key^='remote_runtime_timeout']\")");
    assert_eq!(driver.script("return document.querySelector('#offline').hidden"), true, "the gateway answered");
    assert_ne!(driver.script("return document.querySelector('#summary').textContent"), "offline");
    rt.signal(libc::SIGCONT);
}

/// The workers of a runtime slow to list them show as loading, not as none, until its answer
/// (or why there is none) comes.
#[test]
fn a_listing_under_way_is_not_an_empty_list() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let (url, _held) = black_hole();
    let remote = format!(
        "[[runtimes]]\nid = \"hang\"\nkind = \"remote\"\nbase_url = \"{url}\"\nread_timeout_ms = 3000\nprobe_interval_ms = 60000\n"
    );
    let gw = TestGateway::start("dash-listing", &page_config(&remote));
    driver.open(&gw.url("/#/runtimes/hang"));
    wait_true(&driver, "the list loading", "document.querySelector('#workers').textContent === 'loading…'");
    wait_true(
        &driver,
        "why there is no list",
        "document.querySelector('#workers-error').textContent.startsWith('cannot list workers now')",
    );
    assert_ne!(driver.script("return document.querySelector('#workers').textContent"), "no workers yet");
}

/// An action whose answer is lost on the way back (the gateway died after applying it, the
/// network dropped) does not claim nothing was done: it says it is not known, and the page
/// shows what happened once answers come again.
#[test]
fn an_action_whose_answer_is_lost_does_not_claim_nothing_was_done() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-lost-answer", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "echo"}));
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    // The request goes out and is applied; its answer never reaches the page.
    driver.script(
        "const send = window.fetch; window.lost = true; \
         window.fetch = (url, options) => options?.method === 'POST' && window.lost \
           ? send(url, options).then(() => { window.lost = false; throw new TypeError('Failed to fetch'); }) \
           : send(url, options); return true",
    );
    driver.click("#stop");
    let told = driver
        .wait_script("the toast", "return document.querySelector(\".toast[data-key='offline-action']\")?.textContent");
    assert!(told.to_string().contains("whether it was done is not known"), "{told}");
    assert_eq!(get(&gw.url(&format!("/api/runtimes/local/workers/{wid}"))).body["status"], "stopped", "it was done");
    wait_true(&driver, "the stopped badge", "document.querySelector('#worker-status').textContent === 'stopped'");
    // A gateway shutting down (503 `shutting_down` on a connection opened before) is going
    // offline: the banner says so, and the page's own refreshes raise no error toast.
    driver.keys("\u{E00C}"); // Escape: the toast above goes
    assert_eq!(error_toasts(&driver), json!([]));
    driver.script(
        "const body = JSON.stringify({error: {code: 'shutting_down', message: 'going', retryable: true}}); \
         window.fetch = () => Promise.resolve(new Response(body, {status: 503})); return true",
    );
    wait_true(&driver, "the offline banner", "!document.querySelector('#offline').hidden");
    assert_eq!(error_toasts(&driver), json!([]));
}

/// A worker opened while a turn runs (from the list, where it shows as busy) shows `idle`
/// when the turn ends, and `stopping` then `stopped` when stopped during the next one: the
/// badge follows the stream, not what the list said when it was opened.
#[test]
fn a_worker_opened_mid_turn_follows_its_stream() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-mid-turn", &page_config(""));
    let wid = create(&gw.base, "local", json!({"profile": "chatty"}));
    let words: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    say(&gw.base, "local", &wid, &words.join(" "));
    wait_for("the worker busy", std::time::Duration::from_secs(10), || {
        (get(&gw.url("/api/workers")).body["items"][0]["activity"] == "busy").then_some(())
    });
    driver.open(&gw.url("/#/runtimes/local"));
    driver.wait_script("the busy row", "return document.querySelector('#workers [role=option]')");
    driver.click("#workers [role=option]");
    wait_true(&driver, "the working badge", "document.querySelector('#worker-status').textContent === 'working'");
    wait_true(&driver, "the idle badge", "document.querySelector('#worker-status').textContent === 'idle'");
    say(&gw.base, "local", &wid, &words.join(" "));
    wait_true(&driver, "working again", "document.querySelector('#worker-status').textContent === 'working'");
    driver.click("#stop");
    // Its reply comes after the stop's note: the note says the turn may still finish.
    let stopped = "return [...document.querySelectorAll('#entries .note')].map((n) => n.textContent).join('|')";
    let notes = driver.wait_script(
        "the stop's note",
        &format!("const t = (() => {{ {stopped} }})(); return t.includes('worker stopped') && t"),
    );
    assert!(notes.to_string().contains("worker stopped; its running turn may still finish"), "{notes}");
    // While it finishes, Cancel can still end the turn now.
    wait_true(&driver, "the stopping badge", "document.querySelector('#worker-status').textContent === 'stopping'");
    assert_eq!(driver.script("return document.querySelector('#cancel').disabled"), false);
    assert_eq!(driver.script("return document.querySelector('#stop').disabled"), true);
    wait_true(&driver, "the stopped badge", "document.querySelector('#worker-status').textContent === 'stopped'");
    assert_eq!(error_toasts(&driver), json!([]));
}

#[test]
fn a_flood_of_entries_keeps_the_page_responsive_and_bounded() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-flood", &page_config(""));
    let long_label = "x".repeat(300);
    let wid =
        create(&gw.base, "local", json!({"profile": "echo", "intent": {"kind": "task", "objective": long_label}}));
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    assert_eq!(driver.script("return document.documentElement.scrollWidth <= innerWidth"), true, "a long label wraps");
    for i in 0..1500 {
        say(&gw.base, "local", &wid, &format!("flood {i}"));
    }
    driver.wait_script(
        "the last entry",
        "const t = [...document.querySelectorAll('#entries .msg .text')].pop(); return t && t.textContent === 'flood 1499'",
    );
    let shown = driver.script("return document.querySelectorAll('#entries .msg').length").as_u64().unwrap();
    assert!(shown <= 2300, "the page keeps a bounded window, not all 3000 entries: {shown}");
    // Still answering: a refresh happens and earlier entries can be loaded.
    let seen = driver.script("return document.querySelector('#summary').textContent");
    driver.wait_script("a refresh", &format!("return document.querySelector('#summary').textContent !== {seen}"));
    assert_eq!(driver.script("return document.querySelector('#earlier').hidden"), false, "the rest is a click away");
    assert_eq!(error_toasts(&driver), json!([]));
}

/// A reply cut short by a `kill -9` of the gateway (its embedded runtime with it) shows once
/// after the restart: the runtime records it as the interrupted turn's reply, and the page has
/// it twice to reconcile, as the bubble it was streaming and as a transcript entry. An input
/// queued behind it runs after the restart, and its reply shows once too.
#[test]
fn a_reply_cut_by_a_gateway_crash_shows_once_after_the_restart() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let dir = temp_dir("dash-crash");
    let store = dir.join("data");
    let config = dir.join("gateway.toml");
    let runtime = format!("store = \"fs\"\ndata_dir = \"{}\"\n", store.display());
    // A reply of 400 words at 4 a second: still under way when the page shows its start,
    // however slowly a loaded machine opens the page.
    let slow = "[profiles.slow]\nkind = \"echo\"\ndelay_ms = 250\n";
    std::fs::write(&config, page_config(slow).replace("store = \"memory\"\n", &runtime)).unwrap();
    let port = free_port();
    let gateway = serve(&config, port);
    let wid = create(&gateway.base, "local", json!({"profile": "slow"}));
    let words: Vec<String> = (0..400).map(|i| format!("c{i}")).collect();
    say(&gateway.base, "local", &wid, &words.join(" "));
    // Acknowledged while the reply runs, so it runs after the restart.
    say(&gateway.base, "local", &wid, "queued second input");
    driver.open(&gateway.url(&format!("/#/runtimes/local/workers/{wid}")));
    wait_true(
        &driver,
        "a reply under way",
        "document.querySelector('.msg.assistant .text')?.textContent.includes('c3 ')",
    );
    let busy = get(&gateway.url(&format!("/api/runtimes/local/workers/{wid}"))).body;
    assert_eq!(busy["activity"], "busy", "the turn is still under way: {busy}");

    drop(gateway); // SIGKILL, mid-reply
    wait_true(&driver, "the page noticing", "document.querySelector('#stream').textContent === 'reconnecting…'");
    let gateway = serve(&config, port);
    let worker = wait_for("the queued input answered", std::time::Duration::from_secs(20), || {
        let w = get(&gateway.url(&format!("/api/runtimes/local/workers/{wid}"))).body;
        (w["activity"] == "idle" && w["transcript_len"] == 5).then_some(w)
    });
    // Until the page's stream has reached the worker's last event.
    let last = format!("{:016x}", worker["last_event_id"].as_u64().expect("last_event_id"));
    wait_true(&driver, "the stream caught up", &format!("state.cursor && state.cursor.endsWith('{last}')"));
    wait_true(&driver, "live again", "document.querySelector('#stream').textContent === 'live'");
    let expected = transcript_texts(&gateway.base, &wid);
    assert_eq!(expected.len(), 5, "the inputs, the reply so far, the note, the next reply: {expected:?} {worker}");
    assert!(expected[3].contains("interrupted"), "{expected:?}");
    assert_eq!(expected[4], "queued second input", "{expected:?}");
    assert_eq!(messages(&driver), expected, "each entry once, in order");
    driver.screenshot("crash-reply-once");
}

/// A remote runtime's card counts the workers the page just listed, not those of the
/// runtime's last probe (a minute old here), and `?` once the runtime is down.
#[test]
fn a_runtime_card_counts_what_was_just_listed_and_nothing_once_the_runtime_is_down_nor_its_workers_state() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let rt = memory_runtime(&temp_dir("dash-count"), "\n[profiles.echo]\nkind = \"echo\"\n");
    let remote = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n\n[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\n\
         probe_interval_ms = 60000\n",
        rt.base
    );
    let gw = TestGateway::start("dash-count", &remote);
    wait_health(&gw.base, "lab", "healthy");
    assert_eq!(get(&gw.url("/api/runtimes/lab")).body["worker_count"], 0, "the probe saw none");
    let wid = create(&gw.base, "lab", json!({"profile": "echo"}));
    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    let card = "document.querySelector('#runtimes [role=option] .info').textContent";
    wait_true(&driver, "the listed count", &format!("{card}.startsWith('lab · 1 worker')"));
    let badge = "document.querySelector('#worker-status')";
    wait_true(&driver, "the worker idle", &format!("{badge}.textContent === 'idle'"));
    drop(rt);
    wait_true(&driver, "no count for a runtime that is down", &format!("{card}.startsWith('lab · ? workers')"));
    // Nor a state for its worker: what was last known is said as such.
    wait_true(&driver, "the worker's state unknown", &format!("{badge}.textContent === 'unknown'"));
    assert_eq!(driver.script(&format!("return {badge}.title")), "its runtime is unreachable; last known: idle");
}

/// A runtime that stops answering (SIGSTOP): a worker opened by its link is `unknown`, with
/// nothing offered, until the runtime answers (it used to show `idle`, every button on). A
/// message whose answer never came is said to be not confirmed; sent again unchanged, it goes
/// with the same Idempotency-Key and is applied once (each Send used to make a new key, and
/// the second press applied it twice).
#[test]
fn a_runtime_that_stops_answering_leaves_nothing_unknown_shown_as_known_nor_applied_twice() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let dir = temp_dir("dash-frozen");
    let data = dir.join("data");
    let port = free_port();
    let rt = runtime_on(port, &["--data-dir", data.to_str().unwrap()]);
    let config = remote_config(port, "") + "read_timeout_ms = 500\nwrite_timeout_ms = 500\n";
    let gw = TestGateway::start("dash-frozen", &config);
    wait_health(&gw.base, "lab", "healthy");
    let wid = create(&gw.base, "lab", json!({"profile": "echo"}));

    rt.signal(libc::SIGSTOP);
    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "a toast", "document.querySelector('.toast')");
    let status = "return document.querySelector('#worker-status').textContent";
    wait_true(&driver, "the unknown badge", &format!("(() => {{ {status} }})() === 'unknown'"));
    let offered = "return ['interrupt','stop','cancel','send','input','delete'].filter((id) => !document.getElementById(id).disabled)";
    assert_eq!(driver.script(offered), json!([]), "nothing acts on a worker whose state is unknown");
    driver.screenshot("frozen-unknown");
    rt.signal(libc::SIGCONT);
    driver.wait_script("the real state", &format!("{status} === 'idle' || null"));
    let stale = "return [...document.querySelectorAll('.toast')].map((t) => t.textContent).filter((t) => /remote_runtime_timeout/.test(t))";
    assert_eq!(driver.script(stale), json!([]), "what said the runtime did not answer went with the recovery");
    wait_true(&driver, "Send enabled", "!document.querySelector('#send').disabled");

    rt.signal(libc::SIGSTOP);
    driver.click("#input");
    driver.keys("pay invoice 42\u{E007}");
    let unconfirmed = "[...document.querySelectorAll('.toast')].some((t) => t.textContent.includes('did not confirm “pay invoice 42”'))";
    wait_true(&driver, "not confirmed", unconfirmed);
    assert_eq!(driver.script("return document.querySelector('#input').value"), "pay invoice 42", "kept to send again");
    // Sent again unchanged while the runtime is still frozen: the same key, not a new message.
    driver.click("#send");
    wait_true(&driver, "sending", "document.querySelector('#send').textContent === 'Sending…'");
    wait_true(&driver, "given up again", "document.querySelector('#send').textContent === 'Send'");
    assert_eq!(driver.script(&format!("return {unconfirmed}")), true);
    rt.signal(libc::SIGCONT);
    // Every attempt reaches the runtime now; the stream shows the message applied, once.
    wait_true(&driver, "the box emptied by the stream", "document.querySelector('#input').value === ''");
    let settled = || {
        let detail = get(&gw.url(&format!("/api/runtimes/lab/workers/{wid}"))).body;
        (detail["activity"] == "idle" && detail["transcript_len"].as_u64() >= Some(2)).then_some(())
    };
    wait_for("the turn", std::time::Duration::from_secs(20), settled);
    let items = get(&gw.url(&format!("/api/runtimes/lab/workers/{wid}/transcript"))).body["items"].clone();
    let users = items.as_array().unwrap().iter().filter(|i| i["role"] == "user").count();
    assert_eq!(users, 1, "applied once: {items}");
    // A deliberate repeat afterwards is a new message.
    driver.click("#input");
    driver.keys("pay invoice 42\u{E007}");
    wait_transcript_on(&gw.base, "lab", &wid, 4);
    driver.screenshot("frozen-sent-once");
}

/// A runtime stopped (SIGTERM) mid-turn records why the turn ended; the page, which could not
/// read that entry while the runtime was down, reads it once the runtime is back instead of
/// adding a note of its own (the log said it twice).
#[test]
fn a_turn_ended_by_a_runtime_shutdown_is_told_once() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let dir = temp_dir("dash-told-once");
    let runtime_config = dir.join("runtime.toml");
    std::fs::write(
        &runtime_config,
        "[runtime]\nstop_grace_ms = 100\n\n[profiles.slow]\nkind = \"echo\"\ndelay_ms = 300\n",
    )
    .expect("runtime config");
    let data = dir.join("data");
    let args = ["--config", runtime_config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
    let port = free_port();
    let rt = runtime_on(port, &args);
    let gw = TestGateway::start("dash-told-once", &remote_config(port, ""));
    wait_health(&gw.base, "lab", "healthy");
    let wid = create(&gw.base, "lab", json!({"profile": "slow"}));
    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{wid}")));
    wait_true(&driver, "the stream", "document.querySelector('#stream').textContent === 'live'");
    say(&gw.base, "lab", &wid, "one two three four five six seven eight nine ten");
    wait_true(&driver, "the reply under way", "document.querySelector('#worker-status').textContent === 'working'");
    rt.signal(libc::SIGTERM);
    let mut rt = rt;
    rt.wait(std::time::Duration::from_secs(20));
    let _rt = runtime_on(port, &args);
    let told = "[...document.querySelectorAll('#entries > *')].filter((e) => /interrupted/.test(e.textContent)).length";
    driver.wait_script("the turn's end", &format!("return {told} >= 1 || null"));
    wait_true(&driver, "live again", "document.querySelector('#stream').textContent === 'live'");
    wait_true(&driver, "idle", "document.querySelector('#worker-status').textContent === 'idle'");
    assert_eq!(driver.script(&format!("return {told}")), json!(1), "told once: {}", notes(&driver));
    driver.screenshot("told-once");
}

#[test]
fn a_worker_opened_from_another_while_its_reads_are_slow_shows_each_entry_once() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let other = "\n[[runtimes]]\nid = \"other\"\nkind = \"embedded\"\nstore = \"memory\"\n";
    let gw = TestGateway::start("dash-switch", &page_config(other));
    let first = create(&gw.base, "local", json!({"profile": "echo"}));
    say(&gw.base, "local", &first, "first");
    wait_turn_ended(&gw.base, "local", &first);
    let second = create(&gw.base, "other", json!({"profile": "echo"}));
    say(&gw.base, "other", &second, "second");
    wait_turn_ended(&gw.base, "other", &second);
    driver.open(&gw.url(&format!("/#/runtimes/local/workers/{first}")));
    wait_true(&driver, "the first worker's log", "document.querySelectorAll('#entries .msg').length === 2");
    // The worker's own read answers late, the transcript's later still: the new runtime's
    // listing comes back first and tells of entries the page has not shown.
    driver.script(
        "window.pending = 0; window.listed = false; const plain = window.fetch;
         window.fetch = async (url, options) => {
           const path = String(url);
           window.pending++;
           try {
             if (/\\/workers\\/[^/?]+$/.test(path)) await new Promise((r) => setTimeout(r, 400));
             if (/\\/transcript\\?/.test(path)) await new Promise((r) => setTimeout(r, 800));
             const answer = await plain(url, options);
             const body = await answer.text();
             if (/\\/runtimes\\/other\\/workers/.test(path) && !/\\/workers\\/[^/?]+/.test(path)) window.listed = true;
             return new Response(body, { status: answer.status, statusText: answer.statusText, headers: answer.headers });
           } finally { window.pending--; }
         };
         return true",
    );
    driver.script(&format!("location.hash = '#/runtimes/other/workers/{second}'; return true"));
    wait_true(&driver, "the second worker's log", "document.querySelectorAll('#entries .msg').length >= 2");
    wait_true(&driver, "every read answered", "window.listed && window.pending === 0");
    // What the last answers started has run once a few turns of the event loop have passed.
    driver.script(
        "window.turns = 0; const turn = () => { if (++window.turns < 5) setTimeout(turn, 0); }; turn(); return true",
    );
    wait_true(&driver, "the page's work done", "window.turns >= 5");
    assert_eq!(messages(&driver), ["second", "second"], "each entry once");
    driver.screenshot("switch-once");
}

/// The message box is the open worker's: a draft stays with its worker when another is
/// opened (it went to whichever worker was open at Enter), and a message not confirmed is
/// settled when its worker is opened again and its log shows it (the box kept it for ever
/// when the page had looked at another worker meanwhile).
#[test]
fn the_message_box_belongs_to_its_worker() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let dir = temp_dir("dash-drafts");
    let data = dir.join("data");
    let port = free_port();
    let rt = runtime_on(port, &["--data-dir", data.to_str().unwrap()]);
    let config = remote_config(port, "") + "read_timeout_ms = 500\nwrite_timeout_ms = 500\n";
    let gw = TestGateway::start("dash-drafts", &config);
    wait_health(&gw.base, "lab", "healthy");
    let (a, b) =
        (create(&gw.base, "lab", json!({"profile": "echo"})), create(&gw.base, "lab", json!({"profile": "echo"})));
    let open = |wid: &str| {
        driver.script(&format!("location.hash = '#/runtimes/lab/workers/{wid}'; return true"));
        wait_true(
            &driver,
            "the worker open",
            &format!("document.querySelector('#worker-sub').textContent.includes('{wid}')"),
        );
    };
    let boxed = "return document.querySelector('#input').value";

    driver.open(&gw.url(&format!("/#/runtimes/lab/workers/{b}")));
    wait_true(&driver, "Send enabled", "!document.querySelector('#input').disabled");
    driver.click("#input");
    driver.keys("draft for b");
    open(&a);
    assert_eq!(driver.script(boxed), "", "b's draft is not a's");
    wait_true(&driver, "Send enabled", "!document.querySelector('#input').disabled");

    rt.signal(libc::SIGSTOP);
    driver.click("#input");
    driver.keys("pay invoice 43\u{E007}");
    let unconfirmed = "[...document.querySelectorAll('.toast')].some((t) => t.textContent.includes('did not confirm “pay invoice 43”'))";
    wait_true(&driver, "not confirmed", unconfirmed);
    open(&b);
    assert_eq!(driver.script(boxed), "draft for b", "b's draft is back");
    rt.signal(libc::SIGCONT);
    wait_transcript_on(&gw.base, "lab", &a, 2);
    driver.script("history.back(); return true");
    wait_true(
        &driver,
        "a's log shows the message",
        "[...document.querySelectorAll('.msg.user .text')].some((e) => e.textContent === 'pay invoice 43')",
    );
    wait_true(&driver, "the box emptied", "document.querySelector('#input').value === ''");
    assert_eq!(driver.script(&format!("return {unconfirmed}")), false, "the toast went with it");
    let items = get(&gw.url(&format!("/api/runtimes/lab/workers/{b}/transcript"))).body["items"].clone();
    assert_eq!(items, json!([]), "nothing went to b");
    driver.screenshot("drafts");
}

/// A link to a worker that never existed, opened while its runtime is down, says `missing`
/// (not found) once the runtime answers, as it does when the runtime is up (it said `gone`,
/// as of a worker that had been there).
#[test]
fn a_link_to_no_worker_opened_while_its_runtime_is_down_is_missing_once_it_answers() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let data = temp_dir("dash-missing-later").join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let port = free_port();
    let rt = runtime_on(port, &args);
    let gw = TestGateway::start("dash-missing-later", &remote_config(port, ""));
    wait_health(&gw.base, "lab", "healthy");
    drop(rt);
    wait_health(&gw.base, "lab", "unreachable");
    driver.open(&gw.url("/#/runtimes/lab/workers/worker-0000ffff"));
    wait_true(&driver, "the unknown badge", "document.querySelector('#worker-status').textContent === 'unknown'");
    let _rt = runtime_on(port, &args);
    wait_true(&driver, "not found", "document.querySelector('#worker-title-gone').textContent === ' (not found)'");
    assert_eq!(driver.script("return document.querySelector('#worker-status').textContent"), "missing");
}

/// A worker cancelled and deleted elsewhere (another tab, a script) at once: the page says it
/// is gone, and nothing else (it showed a `worker_not_found` toast from a read the cancel had
/// started).
#[test]
fn a_worker_deleted_elsewhere_right_after_its_cancel_is_only_gone() {
    let Some(driver) = Driver::start() else { return };
    driver.resize(1280, 900);
    let gw = TestGateway::start("dash-deleted-elsewhere", &page_config(""));
    for round in 0..5 {
        let wid = create(&gw.base, "local", json!({"profile": "chatty"}));
        // Six seconds of reply: still under way when the page has opened on a loaded machine
        // (it is cancelled long before it ends).
        say(&gw.base, "local", &wid, "word ".repeat(100).trim());
        driver.open(&gw.url(&format!("/#/runtimes/local/workers/{wid}")));
        wait_true(&driver, "the reply under way", "document.querySelector('#worker-status').textContent === 'working'");
        let cancelled = post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/cancel")), &json!({}));
        assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
        // At once, or as soon as the cancelled turn has ended (409 `worker_running` until then).
        wait_for("the delete", std::time::Duration::from_secs(10), || {
            let deleted = request("DELETE", &gw.url(&format!("/api/runtimes/local/workers/{wid}")), &[]);
            match deleted.status {
                200 => Some(()),
                409 if deleted.code() == "worker_running" => None,
                _ => panic!("{:?}", deleted.body),
            }
        });
        wait_true(&driver, "gone", "document.querySelector('#worker-title-gone').textContent === ' (gone)'");
        assert_eq!(error_toasts(&driver), json!([]), "round {round}: {}", notes(&driver));
        assert!(!notes(&driver).contains("lost the connection"), "round {round}: {}", notes(&driver));
        let stream = driver.script("return document.querySelector('#stream').textContent");
        assert_eq!(stream, "this worker no longer exists", "round {round}");
    }
}
