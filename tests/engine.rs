//! The runtime engine on its own: the event log of a turn, fs-store recovery (running
//! workers stay running, cut-short turns are closed as interrupted, acknowledged inputs
//! run), deletion, and worker ids that never name two workers.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{temp_dir, wait_for};
use worker_gateway::runtime::engine::{Engine, EngineOptions, Profile, StoreKind};
use worker_gateway::runtime::handle::{RuntimeError, RuntimeHandle};
use worker_gateway::runtime::types::*;

fn open_engine(store: StoreKind) -> Engine {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    profiles.insert("slow".to_owned(), Profile::echo("slow", Duration::from_millis(100)));
    let mut options = EngineOptions::new("rt-test", store, profiles);
    options.stop_grace = Duration::from_millis(50);
    Engine::open(options).expect("engine opens")
}

fn create_with(engine: &Engine, profile: &str) -> WorkerDetail {
    let request = CreateWorker {
        intent: Intent::Task { objective: "test".into() },
        profile: ProfileRef::Named(profile.into()),
        extras: CreateExtras::default(),
        idempotency_key: None,
    };
    engine.create_worker(request).expect("create")
}

fn items(engine: &Engine, worker: &str) -> Vec<(Role, String)> {
    let t = engine.transcript(worker, 0, 256).unwrap();
    t.items.into_iter().map(|i| (i.role, i.content)).collect()
}

fn turn_ends(engine: &Engine, worker: &str) -> Vec<(u64, Option<TurnOutcome>)> {
    let events = engine.events_after(worker, 0).unwrap();
    events
        .iter()
        .filter_map(|e| match e.payload {
            EventPayload::TurnEnd { turn, outcome, .. } => Some((turn, outcome)),
            _ => None,
        })
        .collect()
}

fn create(engine: &Engine) -> WorkerDetail {
    let request = CreateWorker {
        intent: Intent::Task { objective: "test".into() },
        profile: ProfileRef::RuntimeDefault,
        extras: CreateExtras::default(),
        idempotency_key: None,
    };
    engine.create_worker(request).expect("create")
}

fn say(engine: &Engine, worker: &str, text: &str) -> InputAck {
    engine
        .input(worker, WorkerInput { kind: InputKind::User, content: text.into(), idempotency_key: None })
        .expect("input")
}

/// A worker on the fs store in `dir` that answered `text` once, its engine closed again.
fn worker_after_one_turn(dir: &std::path::Path, text: &str) -> String {
    let engine = open_engine(StoreKind::Fs(dir.to_path_buf()));
    let w = create(&engine);
    say(&engine, &w.worker_id, text);
    wait_idle(&engine, &w.worker_id, 2);
    w.worker_id
}

fn wait_idle(engine: &Engine, worker: &str, entries: u64) {
    wait_for("the worker to go idle", Duration::from_secs(10), || {
        let w = engine.worker(worker).ok()?;
        (w.activity == Some(Activity::Idle) && w.transcript_len >= entries).then_some(())
    });
}

#[test]
fn a_turn_publishes_its_events_in_order() {
    let engine = open_engine(StoreKind::Memory);
    let w = create(&engine);
    let ack = say(&engine, &w.worker_id, "hello big world");
    wait_idle(&engine, &w.worker_id, 2);
    let events = engine.events_after(&w.worker_id, 0).unwrap();
    let names: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_value(&e.payload).unwrap()["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "lifecycle",
            "user_message",
            "status",
            "turn_start",
            "text_delta",
            "text_delta",
            "text_delta",
            "text_done",
            "turn_end",
            "status"
        ]
    );
    assert!(events.windows(2).all(|p| p[0].seq < p[1].seq), "strictly increasing");
    assert_eq!(events[0].seq, 2, "event 1 is `runtime started`");
    assert_eq!(events[1].seq, ack.event_id);
    let deltas: String = events
        .iter()
        .filter_map(|e| match &e.payload {
            EventPayload::TextDelta { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deltas, "hello big world");
    let end = EventPayload::TurnEnd { turn: 1, result: TurnResult::Finished, outcome: Some(TurnOutcome::Completed) };
    assert!(events.iter().any(|e| e.payload == end));
    assert_eq!(engine.events_after(&w.worker_id, events[7].seq).unwrap().len(), 2, "a cursor means `after`");
}

#[test]
fn event_ids_are_runtime_wide_and_transcript_sequences_per_worker() {
    let engine = open_engine(StoreKind::Memory);
    let (a, b) = (create(&engine), create(&engine));
    assert!(a.worker_id.starts_with("worker-") && a.worker_id.ends_with("-00000001"), "{}", a.worker_id);
    assert!(b.worker_id.ends_with("-00000002"), "{}", b.worker_id);
    let first = say(&engine, &a.worker_id, "one");
    let second = say(&engine, &b.worker_id, "two");
    assert_eq!((first.transcript_sequence, second.transcript_sequence), (1, 1));
    assert!(second.event_id > first.event_id);
    assert_eq!(engine.worker("worker-00000009").unwrap_err(), RuntimeError::WorkerNotFound);
}

#[test]
fn fs_store_recovers_running_workers_and_counters_continue() {
    let dir = temp_dir("recover");
    let (worker, last_event) = {
        let engine = open_engine(StoreKind::Fs(dir.clone()));
        let w = create(&engine);
        say(&engine, &w.worker_id, "remember me");
        wait_idle(&engine, &w.worker_id, 2);
        let last = engine.worker(&w.worker_id).unwrap().last_event_id;
        (w.worker_id, last)
    };
    let engine = open_engine(StoreKind::Fs(dir.clone()));
    let w = engine.worker(&worker).expect("worker is back");
    assert_eq!(w.status, WorkerStatus::Running, "only stop and cancel end a worker");
    assert_eq!(items(&engine, &worker), [(Role::User, "remember me".into()), (Role::Assistant, "remember me".into())]);
    assert!(w.last_event_id >= last_event);
    let ack = say(&engine, &worker, "still here");
    assert!(ack.event_id > last_event, "event ids continue");
    wait_idle(&engine, &worker, 4);
    assert_eq!(create(&engine).worker_id, "worker-00000002", "worker ids are never reused");
    let summary = engine.summary().unwrap();
    assert_eq!((summary.backend.as_str(), summary.worker_count, summary.active_worker_count), ("fs_store", 2, 2));
}

/// Cuts a worker's journal after its last `turn_start` line plus `keep` more lines, as a
/// SIGKILL mid-turn leaves it.
fn cut_after_turn_start(dir: &std::path::Path, worker: &str, keep: usize) {
    let path = dir.join("workers").join(format!("{worker}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().rposition(|l| l.contains("\"turn_start\"")).expect("a turn started");
    std::fs::write(&path, lines[..=start + keep].join("\n") + "\n").unwrap();
}

#[test]
fn a_turn_cut_short_by_a_crash_is_closed_as_interrupted_and_the_worker_takes_input() {
    let dir = temp_dir("interrupted");
    let worker = worker_after_one_turn(&dir, "one two three");
    cut_after_turn_start(&dir, &worker, 1); // turn_start and the first text_delta survive

    let engine = open_engine(StoreKind::Fs(dir.clone()));
    let w = engine.worker(&worker).unwrap();
    assert_eq!((w.status, w.activity), (WorkerStatus::Running, Some(Activity::Idle)), "never busy forever");
    assert_eq!(turn_ends(&engine, &worker), [(1, Some(TurnOutcome::Interrupted))]);
    let entries = items(&engine, &worker);
    assert_eq!(entries[..2], [(Role::User, "one two three".into()), (Role::Assistant, "one ".into())]);
    assert_eq!(entries[2].0, Role::System);
    assert!(entries[2].1.contains("interrupted by a restart"), "{}", entries[2].1);

    say(&engine, &worker, "again");
    wait_idle(&engine, &worker, 5);
    assert_eq!(turn_ends(&engine, &worker)[1], (2, Some(TurnOutcome::Completed)));
    drop(engine);
    let reopened = open_engine(StoreKind::Fs(dir));
    assert_eq!(turn_ends(&reopened, &worker).len(), 2, "the interruption is recorded once");
}

#[test]
fn inputs_acknowledged_but_never_run_run_after_a_restart() {
    let dir = temp_dir("pending");
    let worker = worker_after_one_turn(&dir, "first");
    // A second input acknowledged while turn 1 ran, then the process died.
    cut_after_turn_start(&dir, &worker, 0);
    let path = dir.join("workers").join(format!("{worker}.jsonl"));
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "{{\"record\":\"entry\",\"sequence\":2,\"role\":\"user\",\"content\":\"second\",\"event_id\":900}}\n\
         {{\"record\":\"event\",\"seq\":900,\"worker_id\":\"{worker}\",\"payload\":{{\"event\":\"user_message\",\"data\":{{\"segments\":[{{\"type\":\"text\",\"text\":\"second\"}}]}}}}}}\n"
    ));
    std::fs::write(&path, text).unwrap();

    let engine = open_engine(StoreKind::Fs(dir));
    wait_idle(&engine, &worker, 4); // first, second, the interruption note, second's reply
    assert_eq!(turn_ends(&engine, &worker), [(1, Some(TurnOutcome::Interrupted)), (2, Some(TurnOutcome::Completed))]);
    let entries = items(&engine, &worker);
    assert_eq!(entries.last().unwrap(), &(Role::Assistant, "second".to_owned()), "{entries:?}");
}

#[test]
fn a_graceful_shutdown_interrupts_turns_keeps_workers_running_and_queued_inputs_run_later() {
    let dir = temp_dir("shutdown");
    let worker = {
        let engine = open_engine(StoreKind::Fs(dir.clone()));
        let w = create_with(&engine, "slow");
        say(&engine, &w.worker_id, "a b c d e f g h i j");
        say(&engine, &w.worker_id, "queued");
        wait_for("the turn to stream", Duration::from_secs(5), || {
            let n = engine.events_after(&w.worker_id, 0).ok()?;
            n.iter().any(|e| matches!(e.payload, EventPayload::TextDelta { .. })).then_some(())
        });
        engine.shutdown(Duration::from_millis(20));
        assert_eq!(turn_ends(&engine, &w.worker_id), [(1, Some(TurnOutcome::Interrupted))]);
        w.worker_id
    };
    let engine = open_engine(StoreKind::Fs(dir));
    assert_eq!(engine.worker(&worker).unwrap().status, WorkerStatus::Running);
    wait_for("the queued input to run", Duration::from_secs(10), || {
        (turn_ends(&engine, &worker).len() == 2).then_some(())
    });
    assert_eq!(turn_ends(&engine, &worker)[1], (2, Some(TurnOutcome::Completed)));
    let entries = items(&engine, &worker);
    assert!(entries.iter().any(|(r, c)| *r == Role::System && c.contains("shut down")), "{entries:?}");
}

/// A reply cut short by stop or cancel is followed by a `system` entry that says so, and
/// inputs dropped from the queue are said to be: read back later, the transcript tells a
/// short reply from a complete one, and an input never answered from one forgotten.
#[test]
fn a_turn_cut_short_by_stop_or_cancel_says_so_in_the_transcript() {
    let engine = open_engine(StoreKind::Memory);
    for (end, said) in [("stop", "the worker was stopped"), ("cancel", "the worker was cancelled")] {
        let w = create_with(&engine, "slow");
        say(&engine, &w.worker_id, "a b c d e f g h i j");
        say(&engine, &w.worker_id, "queued, never run");
        wait_for("the turn to stream", Duration::from_secs(5), || {
            let n = engine.events_after(&w.worker_id, 0).ok()?;
            n.iter().any(|e| matches!(e.payload, EventPayload::TextDelta { .. })).then_some(())
        });
        match end {
            "stop" => engine.stop(&w.worker_id, None).expect("stop"),
            _ => engine.cancel(&w.worker_id, None).expect("cancel"),
        };
        wait_for("the turn to end", Duration::from_secs(5), || {
            (turn_ends(&engine, &w.worker_id).len() == 1).then_some(())
        });
        assert_eq!(turn_ends(&engine, &w.worker_id), [(1, Some(TurnOutcome::Cancelled))], "{end}");
        let entries = items(&engine, &w.worker_id);
        // The inputs, the queued one dropped (said at once), the reply so far, the note.
        assert_eq!(entries.len(), 5, "{end}: {entries:?}");
        assert_eq!(entries[2], (Role::System, format!("1 queued input was not run: {said}.")));
        assert_eq!(entries[3].0, Role::Assistant, "{entries:?}");
        assert!(!entries[3].1.contains('j'), "the reply was cut short ({end}): {entries:?}");
        assert_eq!(entries[4], (Role::System, format!("Turn 1 was cut short: {said}.")));
    }
}

#[test]
fn only_ended_workers_can_be_deleted_and_their_ids_are_never_reused() {
    let dir = temp_dir("delete");
    let (kept, gone) = {
        let engine = open_engine(StoreKind::Fs(dir.clone()));
        let kept = create(&engine).worker_id;
        let gone = create(&engine).worker_id;
        assert_eq!(engine.delete(&gone), Err(RuntimeError::WorkerRunning));
        engine.stop(&gone, None).unwrap();
        engine.delete(&gone).expect("a stopped worker can be deleted");
        assert_eq!(engine.delete(&gone), Err(RuntimeError::WorkerNotFound));
        assert_eq!(engine.worker(&gone).unwrap_err(), RuntimeError::WorkerNotFound);
        (kept, gone)
    };
    assert!(!dir.join("workers").join(format!("{gone}.jsonl")).exists(), "its files are gone");
    let engine = open_engine(StoreKind::Fs(dir));
    assert_eq!(engine.worker(&gone).unwrap_err(), RuntimeError::WorkerNotFound);
    assert!(engine.worker(&kept).is_ok());
    let next = create(&engine).worker_id;
    assert_eq!(next, "worker-00000003", "the deleted id (the highest) is not handed out again");
}

#[test]
fn memory_runtimes_never_hand_out_an_id_another_boot_used() {
    let first = create(&open_engine(StoreKind::Memory)).worker_id;
    let second = create(&open_engine(StoreKind::Memory)).worker_id;
    assert_ne!(first, second);
}

#[test]
fn a_torn_journal_tail_loses_only_the_torn_line() {
    let dir = temp_dir("torn");
    let worker = worker_after_one_turn(&dir, "first");
    let journal = dir.join("workers").join(format!("{worker}.jsonl"));
    let mut text = std::fs::read_to_string(&journal).unwrap();
    text.push_str("{\"record\":\"entry\",\"sequence\":3,\"ro");
    std::fs::write(&journal, text).unwrap();

    let engine = open_engine(StoreKind::Fs(dir));
    let t = engine.transcript(&worker, 0, 10).unwrap();
    assert_eq!(t.items[0].content, "first");
    assert_eq!(t.items[1].content, "first");
    assert_eq!(t.items.len(), 2, "the two good entries");
}

fn keyed(engine: &Engine, worker: &str, text: &str, key: &str) -> InputAck {
    let input = WorkerInput { kind: InputKind::User, content: text.into(), idempotency_key: Some(key.into()) };
    engine.input(worker, input).expect("input")
}

#[test]
fn a_repeated_idempotency_key_returns_the_first_ack_even_across_a_restart() {
    let dir = temp_dir("idempotent");
    let (worker, first, created) = {
        let engine = open_engine(StoreKind::Fs(dir.clone()));
        let request = |key: &str| CreateWorker {
            intent: Intent::Task { objective: "keyed".into() },
            profile: ProfileRef::RuntimeDefault,
            extras: CreateExtras::default(),
            idempotency_key: Some(key.into()),
        };
        let created = engine.create_worker(request("create-1")).unwrap().worker_id;
        assert_eq!(engine.create_worker(request("create-1")).unwrap().worker_id, created, "one worker per key");
        let first = keyed(&engine, &created, "only once", "input-1");
        assert_eq!(keyed(&engine, &created, "only once", "input-1"), first, "the same ack");
        wait_idle(&engine, &created, 2);
        (created.clone(), first, created)
    };
    let engine = open_engine(StoreKind::Fs(dir));
    let again = keyed(&engine, &worker, "only once", "input-1");
    assert_eq!((again.transcript_sequence, again.event_id), (first.transcript_sequence, first.event_id));
    assert_eq!(items(&engine, &worker).len(), 2, "one input, one reply: never a second entry");
    let request = CreateWorker {
        intent: Intent::Task { objective: "keyed".into() },
        profile: ProfileRef::RuntimeDefault,
        extras: CreateExtras::default(),
        idempotency_key: Some("create-1".into()),
    };
    assert_eq!(engine.create_worker(request).unwrap().worker_id, created, "remembered across the restart");
    let other = keyed(&engine, &worker, "a new message", "input-2");
    assert!(other.transcript_sequence > first.transcript_sequence);
}

#[test]
fn an_empty_journal_left_by_a_create_cut_short_does_not_block_creates() {
    let dir = temp_dir("empty-journal");
    {
        let engine = open_engine(StoreKind::Fs(dir.clone()));
        create(&engine);
    }
    // SIGKILL between creating the file and writing its first record leaves it empty.
    std::fs::write(dir.join("workers").join("worker-00000002.jsonl"), "").unwrap();
    let engine = open_engine(StoreKind::Fs(dir.clone()));
    assert_eq!(engine.list_workers().unwrap().len(), 1, "the never-acknowledged create is gone");
    assert_eq!(create(&engine).worker_id, "worker-00000003", "its id is not handed out again");
}

#[test]
fn a_turn_whose_output_was_recorded_but_not_its_end_is_closed_as_it_ended() {
    let dir = temp_dir("done-not-ended");
    let worker = worker_after_one_turn(&dir, "hello there");
    // SIGKILL between the `text_done` and `turn_end` writes.
    let path = dir.join("workers").join(format!("{worker}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let done = lines.iter().rposition(|l| l.contains("\"text_done\"")).expect("text_done recorded");
    std::fs::write(&path, lines[..=done].join("\n") + "\n").unwrap();

    let engine = open_engine(StoreKind::Fs(dir));
    assert_eq!(turn_ends(&engine, &worker), [(1, Some(TurnOutcome::Completed))]);
    assert_eq!(
        items(&engine, &worker),
        [(Role::User, "hello there".to_owned()), (Role::Assistant, "hello there".to_owned())],
        "no second reply, no interruption note"
    );
}
