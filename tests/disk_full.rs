//! A journal write that fails part way (a full disk, here a file size limit) loses nothing
//! acknowledged after it: the fragment is cut off, so the next record is not glued to it
//! and skipped with it at the next start; and a start on a full disk goes on. One test in
//! its own binary: the file size limit it sets holds for the whole process.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::temp_dir;
use worker_gateway::runtime::engine::{Engine, EngineOptions, Profile, StoreKind};
use worker_gateway::runtime::handle::RuntimeHandle;
use worker_gateway::runtime::types::*;

fn open(dir: &std::path::Path) -> Engine {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    Engine::open(EngineOptions::new("rt-full", StoreKind::Fs(dir.to_path_buf()), profiles)).expect("engine opens")
}

fn input(engine: &Engine, worker: &str, text: &str) -> Result<InputAck, worker_gateway::runtime::handle::RuntimeError> {
    engine.input(worker, WorkerInput { kind: InputKind::User, content: text.into(), idempotency_key: None })
}

/// Sets the soft file size limit of this process (the hard one stays as it is).
fn file_size_limit(bytes: libc::rlim_t) {
    // SAFETY: reads and sets this process's own limit; the structs are ours.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[test]
fn an_input_acknowledged_after_a_failed_write_survives_a_restart() {
    // SAFETY: a write past the limit then fails with EFBIG instead of killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = temp_dir("disk-full");
    let worker = {
        let engine = open(&dir);
        let w = engine
            .create_worker(CreateWorker {
                intent: Intent::Task { objective: "disk full".into() },
                profile: ProfileRef::Named("echo".into()),
                extras: CreateExtras::default(),
                idempotency_key: None,
            })
            .expect("create");
        let journal = dir.join("workers").join(format!("{}.jsonl", w.worker_id));
        let size = std::fs::metadata(&journal).expect("the journal").len();
        // Room for part of the next record only.
        file_size_limit(size + 100);
        let refused = input(&engine, &w.worker_id, &"x".repeat(2000));
        file_size_limit(libc::RLIM_INFINITY);
        assert!(refused.is_err(), "the write failed, the input was not acknowledged: {refused:?}");
        let ack = input(&engine, &w.worker_id, "after the disk had room again").expect("acknowledged");
        assert_eq!(ack.transcript_sequence, 1, "{ack:?}");
        w.worker_id
    };
    let engine = open(&dir);
    let items = engine.transcript(&worker, 0, 256).expect("transcript").items;
    assert!(
        items.iter().any(|i| i.role == Role::User && i.content == "after the disk had room again"),
        "the acknowledged input is back: {items:?}"
    );
    assert!(!items.iter().any(|i| i.content.starts_with("xx")), "the refused one is not: {items:?}");
    let entries = items.len();
    drop(engine);

    // A write torn by a kill, found at a start with no room for the byte that ends its line:
    // the start goes on, and the next acknowledged record still gets a line of its own.
    let journal = dir.join("workers").join(format!("{worker}.jsonl"));
    let mut file = std::fs::OpenOptions::new().append(true).open(&journal).expect("the journal");
    std::io::Write::write_all(&mut file, b"{\"record\":\"entry\",\"sequ").expect("a torn record");
    drop(file);
    file_size_limit(std::fs::metadata(&journal).expect("the journal").len());
    let engine = open(&dir);
    file_size_limit(libc::RLIM_INFINITY);
    input(&engine, &worker, "after a start on a full disk").expect("acknowledged");
    drop(engine);
    let engine = open(&dir);
    let items = engine.transcript(&worker, 0, 256).expect("transcript").items;
    assert!(items.len() > entries, "{items:?}");
    assert!(items.iter().any(|i| i.content == "after a start on a full disk"), "{items:?}");
}
