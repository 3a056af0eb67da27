//! A `worker-gateway runtime` process killed (SIGKILL) or stopped (SIGTERM) while a turn
//! streams, then started again on the same data dir: the worker stays running, the cut-short
//! turn is closed as `interrupted` (in the events and with a `system` note), the input it had
//! acknowledged but not run runs, and it takes new input.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const RUNTIME_CONFIG: &str = "[runtime]\nid = \"rt-restart\"\nstop_grace_ms = 300\n\n\
                              [profiles.slow]\nkind = \"echo\"\ndelay_ms = 200\n";

fn start(config: &std::path::Path, dir: &std::path::Path) -> Process {
    let (config, dir) = (config.to_str().unwrap(), dir.to_str().unwrap());
    Process::start(&["runtime", "--config", config, "--bind", "127.0.0.1:0", "--data-dir", dir])
}

/// The transcript as a client that opted in to extensions reads it (role `assistant`).
fn transcript(rt: &Process, wid: &str) -> Vec<Value> {
    let url = rt.url(&format!("/v1/workers/{wid}/transcript?limit=256"));
    let page = request("GET", &url, &[("x-worker-runtime-extensions", "1")]);
    assert_eq!(page.status, 200, "{:?}", page.body);
    page.body["transcript"]["items"].as_array().unwrap().clone()
}

fn wait_answer(rt: &Process, wid: &str, text: &str) {
    wait_for(&format!("the answer to `{text}`"), Duration::from_secs(20), || {
        transcript(rt, wid).iter().any(|i| i["role"] == "assistant" && i["content"] == text).then_some(())
    });
}

fn a_streaming_turn_survives(name: &str, signal: i32) {
    let config = write_config(name, RUNTIME_CONFIG);
    let dir = temp_dir(&format!("{name}-data"));
    let mut first = start(&config, &dir);
    let create =
        json!({"intent": {"kind": "task", "objective": "restart"}, "profile": {"kind": "named", "value": "slow"}});
    let created = post_json(&first.url("/v1/workers"), &create);
    assert_eq!(created.status, 200, "{:?}", created.body);
    let wid = created.body["worker"]["worker_id"].as_str().unwrap().to_owned();
    let input = first.url(&format!("/v1/workers/{wid}/input"));
    // Fifty words at one per 200 ms: ten seconds of streaming, cut short long before the end.
    let long = (1..=50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    for content in [long.as_str(), "queued behind"] {
        let ack = post_json(&input, &json!({"kind": "user", "content": content}));
        assert_eq!(ack.status, 200, "{:?}", ack.body);
    }
    let events = |rt: &Process, query: &str| {
        let url = format!("{}/v1/workers/{wid}/events/ws{query}", rt.base.replace("http://", "ws://"));
        ws_connect(&url, &[]).expect("the event stream opens")
    };
    let mut live = events(&first, "");
    frames_until(&mut live, |f| event_name(f) == "text_delta");

    first.signal(signal);
    let status = first.wait(Duration::from_secs(20));
    if signal == libc::SIGTERM {
        assert_eq!(status.code(), Some(0), "stderr:\n{}", first.stderr.lock().unwrap());
    } else {
        assert_eq!(status.signal(), Some(signal));
    }
    drop(live);

    let second = start(&config, &dir);
    let detail = get(&second.url(&format!("/v1/workers/{wid}"))).body;
    assert_eq!(detail["worker"]["status"], "running", "the worker stays running: {detail}");
    wait_answer(&second, &wid, "queued behind");
    let ack = post_json(&second.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": "after"}));
    assert_eq!(ack.status, 200, "it takes input: {:?}", ack.body);
    wait_answer(&second, &wid, "after");

    let items = transcript(&second, &wid);
    let entries: Vec<(&str, &str)> =
        items.iter().map(|i| (i["role"].as_str().unwrap(), i["content"].as_str().unwrap())).collect();
    assert_eq!(entries.len(), 7, "{entries:#?}");
    assert_eq!(entries[..2], [("user", long.as_str()), ("user", "queued behind")]);
    let (role, partial) = entries[2];
    assert!(
        role == "assistant" && partial.starts_with("w1 ") && long.starts_with(partial) && partial.len() < long.len(),
        "the output so far is kept: {entries:#?}"
    );
    let (role, note) = entries[3];
    assert!(role == "system" && note.contains("Turn 1 was interrupted"), "{entries:#?}");
    assert_eq!(entries[4..], [("assistant", "queued behind"), ("user", "after"), ("assistant", "after")]);

    // From its first event, the worker's stream closes turn 1 as interrupted.
    let mut replay = events(&second, "?cursor=wo_0000000000000000");
    assert_eq!(event_name(&next_frame(&mut replay)), "snapshot");
    let frames =
        frames_until(&mut replay, |f| event_name(f) == "turn_end" && f["envelope"]["payload"]["data"]["turn"] == 1);
    let end = &frames.last().unwrap()["envelope"]["payload"]["data"];
    assert_eq!((&end["result"], &end["outcome"]), (&json!("finished"), &json!("interrupted")), "{end}");
    let starts = frames.iter().filter(|f| event_name(f) == "turn_start").count();
    assert_eq!(starts, 1, "one turn start before that end");
    // Turn 2 (the queued input) and turn 3 complete.
    let rest =
        frames_until(&mut replay, |f| event_name(f) == "turn_end" && f["envelope"]["payload"]["data"]["turn"] == 3);
    let outcomes: Vec<_> = rest
        .iter()
        .filter(|f| event_name(f) == "turn_end")
        .map(|f| f["envelope"]["payload"]["data"]["outcome"].clone())
        .collect();
    assert_eq!(outcomes, [json!("completed"), json!("completed")]);
}

#[test]
fn a_turn_cut_short_by_sigkill_is_closed_as_interrupted() {
    a_streaming_turn_survives("restart-kill", libc::SIGKILL);
}

#[test]
fn a_turn_cut_short_by_sigterm_is_closed_as_interrupted() {
    a_streaming_turn_survives("restart-term", libc::SIGTERM);
}

/// Processes whose command line is exactly `words` (joined by NULs in /proc).
fn processes_running(words: &[&str]) -> usize {
    let wanted: Vec<u8> = words.join("\0").into_bytes();
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .filter(|cmd| cmd.strip_suffix(b"\0").unwrap_or(cmd) == wanted.as_slice())
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_command_turn_dies_with_its_runtime() {
    let unique = format!("{}", 86_000 + std::process::id() % 400);
    let config = write_config(
        "pdeathsig",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nid = \"rt\"\nstore = \"memory\"\n\n\
             [profiles.hang]\nkind = \"command\"\nargv = [\"sleep\", \"{unique}\"]\nturn_timeout_ms = 600000\n"
        ),
    );
    let rt = Process::start(&["runtime", "--config", config.to_str().unwrap()]);
    let body = json!({"intent": {"kind": "assistant"}, "profile": {"kind": "named", "value": "hang"}});
    let created = post_json(&rt.url("/v1/workers"), &body);
    let wid = created.body["worker"]["worker_id"].as_str().expect("a worker").to_owned();
    let input = post_json(&rt.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": "x"}));
    assert_eq!(input.status, 200);
    wait_for("the command to run", Duration::from_secs(10), || {
        (processes_running(&["sleep", &unique]) == 1).then_some(())
    });
    rt.signal(libc::SIGKILL);
    drop(rt);
    wait_for("the command to end with its runtime", Duration::from_secs(10), || {
        (processes_running(&["sleep", &unique]) == 0).then_some(())
    });
}

/// The peak and resident memory of process `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).expect("the field");
        line.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a number")
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A runtime restarted on a large journal (here 16 inputs of 1 MB and their replies) reads it
/// a line at a time and gives the memory of its records back (what stays is the transcript
/// and the 16 events it retains): it used to read the whole file
/// and then all its records at once, twice the journal's size at the peak, and kept that
/// resident.
#[test]
fn a_restart_on_a_large_journal_costs_about_its_transcript() {
    let config = write_config(
        "big-journal",
        "[server]\nmax_body_bytes = 2097152\n[runtime]\nid = \"rt-big\"\nretained_events = 16\n",
    );
    let dir = temp_dir("big-journal-data");
    let first = start(&config, &dir);
    let created = post_json(
        &first.url("/v1/workers"),
        &json!({"intent": {"kind": "assistant"}, "profile": {"kind": "runtime_default"}}),
    );
    assert_eq!(created.status, 200, "{:?}", created.body);
    let wid = created.body["worker"]["worker_id"].as_str().expect("an id").to_owned();
    let big = "x".repeat(1 << 20);
    for _ in 0..16 {
        let said = post_json(&first.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": big}));
        assert_eq!(said.status, 200, "{:?}", said.body);
    }
    wait_for("the replies", Duration::from_secs(60), || {
        let w = get(&first.url(&format!("/v1/workers/{wid}"))).body;
        (w["worker"]["transcript_len"] == 32).then_some(())
    });
    let journal = std::fs::metadata(dir.join("workers").join(format!("{wid}.jsonl"))).expect("the journal").len() >> 10;
    drop(first); // SIGKILL
    let second = start(&config, &dir);
    let (peak, resident) = memory_kb(second.child.id());
    eprintln!("journal {journal} kB; after the restart: peak {peak} kB, resident {resident} kB");
    assert!(peak < journal * 3 / 2, "peak {peak} kB for a journal of {journal} kB");
    assert!(resident < journal * 3 / 4, "resident {resident} kB for a journal of {journal} kB");
}

/// A journal of many small events (an echo of 500 000 one-letter words: one event each,
/// about 60 times the input on disk) is applied as it is read: a restart costs what the
/// worker keeps (its transcript, the events it retains), not the journal. Its records were
/// all held at once before being applied: 2.5 times the journal at the peak (an outside
/// attack: 1.2 GB to start on a 487 MB journal, 6 GB on 2.5 GB).
#[test]
fn a_restart_on_a_journal_of_many_small_events_costs_about_its_transcript() {
    let config = write_config("many-events", "[server]\nmax_body_bytes = 2097152\n[runtime]\nid = \"rt-many\"\n");
    let dir = temp_dir("many-events-data");
    let first = start(&config, &dir);
    let created = post_json(
        &first.url("/v1/workers"),
        &json!({"intent": {"kind": "assistant"}, "profile": {"kind": "runtime_default"}}),
    );
    let wid = created.body["worker"]["worker_id"].as_str().expect("an id").to_owned();
    let words = "x ".repeat(500_000);
    let said = post_json(&first.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": words}));
    assert_eq!(said.status, 200, "{:?}", said.body);
    wait_for("the reply", Duration::from_secs(120), || {
        let w = get(&first.url(&format!("/v1/workers/{wid}"))).body;
        (w["worker"]["transcript_len"] == 2 && w["worker"]["activity"] == "idle").then_some(())
    });
    let journal = std::fs::metadata(dir.join("workers").join(format!("{wid}.jsonl"))).expect("the journal").len() >> 10;
    drop(first); // SIGKILL
    let second = start(&config, &dir);
    let (peak, resident) = memory_kb(second.child.id());
    eprintln!("journal {journal} kB; after the restart: peak {peak} kB, resident {resident} kB");
    assert!(journal > 48 << 10, "a journal of {journal} kB");
    assert!(peak < journal / 3, "peak {peak} kB for a journal of {journal} kB");
    assert_eq!(transcript(&second, &wid).len(), 2, "all of it is back");
}
