//! The runtime engine on its own: the event log of a turn, and fs-store recovery.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{temp_dir, wait_for};
use worker_gateway::runtime::engine::{Engine, EngineOptions, Profile, StoreKind};
use worker_gateway::runtime::handle::{RuntimeError, RuntimeHandle};
use worker_gateway::runtime::types::*;

fn engine(store: StoreKind) -> Engine {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    Engine::open(EngineOptions::new("rt-test", store, profiles)).expect("engine opens")
}

fn create(engine: &Engine) -> WorkerDetail {
    let request = CreateWorker {
        intent: Intent::Task { objective: "test".into() },
        profile: ProfileRef::RuntimeDefault,
        extras: CreateExtras::default(),
    };
    engine.create_worker(request).expect("create")
}

fn say(engine: &Engine, worker: &str, text: &str) -> InputAck {
    engine.input(worker, WorkerInput { kind: InputKind::User, content: text.into() }).expect("input")
}

fn wait_idle(engine: &Engine, worker: &str, entries: u64) {
    wait_for("the worker to go idle", Duration::from_secs(10), || {
        let w = engine.worker(worker).ok()?;
        (w.activity == Some(Activity::Idle) && w.transcript_len >= entries).then_some(())
    });
}

#[test]
fn a_turn_publishes_its_events_in_order() {
    let engine = engine(StoreKind::Memory);
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
    assert!(events.iter().any(|e| e.payload == EventPayload::TurnEnd { turn: 1, result: TurnResult::Completed }));
    assert_eq!(engine.events_after(&w.worker_id, events[7].seq).unwrap().len(), 2, "a cursor means `after`");
}

#[test]
fn event_ids_are_runtime_wide_and_transcript_sequences_per_worker() {
    let engine = engine(StoreKind::Memory);
    let (a, b) = (create(&engine), create(&engine));
    assert_eq!((a.worker_id.as_str(), b.worker_id.as_str()), ("worker-00000001", "worker-00000002"));
    let first = say(&engine, &a.worker_id, "one");
    let second = say(&engine, &b.worker_id, "two");
    assert_eq!((first.transcript_sequence, second.transcript_sequence), (1, 1));
    assert!(second.event_id > first.event_id);
    assert_eq!(engine.worker("worker-00000009").unwrap_err(), RuntimeError::WorkerNotFound);
}

#[test]
fn fs_store_recovers_workers_stopped_with_a_note_and_counters_continue() {
    let dir = temp_dir("recover");
    let (worker, last_event) = {
        let engine = engine(StoreKind::Fs(dir.clone()));
        let w = create(&engine);
        say(&engine, &w.worker_id, "remember me");
        wait_idle(&engine, &w.worker_id, 2);
        let last = engine.worker(&w.worker_id).unwrap().last_event_id;
        (w.worker_id, last)
    };
    let engine = engine(StoreKind::Fs(dir.clone()));
    let w = engine.worker(&worker).expect("worker is back");
    assert_eq!(w.status, WorkerStatus::Stopped);
    let t = engine.transcript(&worker, 0, 10).unwrap();
    let items: Vec<(Role, &str)> = t.items.iter().map(|i| (i.role, i.content.as_str())).collect();
    assert_eq!(items[..2], [(Role::User, "remember me"), (Role::Assistant, "remember me")]);
    assert_eq!(items[2].0, Role::System);
    assert!(items[2].1.contains("restarted"), "{}", items[2].1);
    assert!(w.last_event_id > last_event, "event ids continue");
    assert_eq!(create(&engine).worker_id, "worker-00000002", "worker ids are never reused");
    let summary = engine.summary().unwrap();
    assert_eq!((summary.backend.as_str(), summary.worker_count, summary.stopped_worker_count), ("fs_store", 2, 1));
}

#[test]
fn a_torn_journal_tail_loses_only_the_torn_line() {
    let dir = temp_dir("torn");
    let worker = {
        let engine = engine(StoreKind::Fs(dir.clone()));
        let w = create(&engine);
        say(&engine, &w.worker_id, "first");
        wait_idle(&engine, &w.worker_id, 2);
        w.worker_id
    };
    let journal = dir.join("workers").join(format!("{worker}.jsonl"));
    let mut text = std::fs::read_to_string(&journal).unwrap();
    text.push_str("{\"record\":\"entry\",\"sequence\":3,\"ro");
    std::fs::write(&journal, text).unwrap();

    let engine = engine(StoreKind::Fs(dir));
    let t = engine.transcript(&worker, 0, 10).unwrap();
    assert_eq!(t.items[0].content, "first");
    assert_eq!(t.items[1].content, "first");
    assert_eq!(t.items.len(), 3, "two good entries and the restart note");
}
