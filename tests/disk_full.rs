//! A journal write that fails part way (a full disk, here a file size limit) loses nothing
//! acknowledged after it: the fragment is cut off, so the next record is not glued to it
//! and skipped with it at the next start; and a start on a full disk goes on. A turn whose
//! records cannot be written waits for the disk: its reply is not lost, and no input runs
//! twice. In their own binary, one at a time: the file size limit holds for the whole process.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use common::{temp_dir, wait_for};
use worker_gateway::runtime::engine::{Engine, EngineOptions, Profile, ProfileKind, StoreKind};
use worker_gateway::runtime::handle::RuntimeHandle;
use worker_gateway::runtime::types::*;

/// The tests take turns: each sets the process's file size limit.
static LIMIT: Mutex<()> = Mutex::new(());

fn open(dir: &std::path::Path) -> Engine {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    // Counts its runs in `runs`, says it started, and waits for `go` before it answers.
    let script = format!(
        "echo run >> {d}/runs; touch {d}/started; while [ ! -e {d}/go ]; do sleep 0.02; done; cat",
        d = dir.display()
    );
    let gated = ProfileKind::Command {
        argv: vec!["sh".into(), "-c".into(), script],
        cwd: None,
        env: BTreeMap::new(),
        turn_timeout: Duration::from_secs(60),
        max_output_bytes: 1 << 20,
    };
    profiles.insert("gated".to_owned(), Profile { name: "gated".into(), kind: gated });
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
    let _turn = LIMIT.lock().unwrap_or_else(|p| p.into_inner());
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

/// A create whose records do not all fit is not on record at all: nothing was acknowledged,
/// so no worker appears from it at the next start (its creation record used to stay, a ghost
/// worker running after the restart), and the creates after it go on.
#[test]
fn a_create_that_fails_part_way_leaves_no_ghost() {
    let _turn = LIMIT.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: a write past the limit then fails with EFBIG instead of killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = temp_dir("disk-full-create");
    let create = |engine: &Engine| {
        engine.create_worker(CreateWorker {
            intent: Intent::Task { objective: "a create on a full disk".into() },
            profile: ProfileRef::Named("echo".into()),
            extras: CreateExtras::default(),
            idempotency_key: None,
        })
    };
    let engine = open(&dir);
    let first = create(&engine).expect("a first worker").worker_id;
    let journal = std::fs::read_to_string(dir.join("workers").join(format!("{first}.jsonl"))).expect("its journal");
    // Room for a creation record (as long as the first one's), not for what follows it.
    let created_line = journal.lines().next().expect("a first line").len() as u64;
    file_size_limit(created_line + 1);
    let refused = create(&engine);
    file_size_limit(libc::RLIM_INFINITY);
    assert!(refused.is_err(), "{refused:?}");
    let second = create(&engine).expect("the next create").worker_id;
    drop(engine);
    let engine = open(&dir);
    let ids: Vec<String> = engine.list_workers().expect("list").into_iter().map(|w| w.worker_id).collect();
    assert_eq!(ids, [first, second], "no ghost from the refused create");
}

/// A worker of the `gated` profile on its own disk: its first input's turn runs (and waits
/// for `go`), its second is queued, as the turn tests need them.
struct GatedTurns {
    dir: std::path::PathBuf,
    engine: Engine,
    worker: String,
}

impl GatedTurns {
    /// Takes the file size limit for the test (`turn`), then starts the first turn.
    fn start(name: &str, first: &str) -> (std::sync::MutexGuard<'static, ()>, GatedTurns) {
        let turn = LIMIT.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: a write past the limit then fails with EFBIG instead of killing the process.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let dir = temp_dir(name);
        let engine = open(&dir);
        let create = CreateWorker {
            intent: Intent::Task { objective: name.into() },
            profile: ProfileRef::Named("gated".into()),
            extras: CreateExtras::default(),
            idempotency_key: None,
        };
        let worker = engine.create_worker(create).expect("create").worker_id;
        input(&engine, &worker, first).expect("acknowledged");
        let started = dir.join("started");
        wait_for("the first turn to run", Duration::from_secs(10), || started.exists().then_some(()));
        input(&engine, &worker, "second").expect("acknowledged");
        (turn, GatedTurns { dir, engine, worker })
    }

    /// Lets the journal grow `room` bytes more, then lets the turns answer. No event marks
    /// a write that failed: the first turn's reply is then given a moment to be tried.
    fn fill_and_answer(&self, room: u64) {
        let journal = self.dir.join("workers").join(format!("{}.jsonl", self.worker));
        file_size_limit(std::fs::metadata(&journal).expect("the journal").len() + room);
        std::fs::write(self.dir.join("go"), "").expect("let the turns answer");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The commands' runs, one line each.
    fn runs(&self) -> String {
        std::fs::read_to_string(self.dir.join("runs")).expect("runs")
    }

    /// The transcript as `Role content` (contents cut to 20 bytes), once the worker is idle
    /// with at least `entries` entries.
    fn settled(&self, entries: usize) -> Vec<String> {
        wait_for("the turns", Duration::from_secs(20), || {
            let items = self.engine.transcript(&self.worker, 0, 256).expect("transcript").items;
            let texts: Vec<String> =
                items.iter().map(|i| format!("{:?} {}", i.role, &i.content[..i.content.len().min(20)])).collect();
            let busy = self.engine.worker(&self.worker).expect("the worker").activity == Some(Activity::Busy);
            (texts.len() >= entries && !busy).then_some(texts)
        })
    }
}

/// The disk fills while a turn runs, with another input queued: the turn's reply waits for
/// room and is then recorded (it used to be lost, the turn ending without it), and the
/// queued input does not run before its turn's start is on record (it ran anyway, and a
/// restart then found it not run and ran it a second time).
#[test]
fn a_turn_waits_for_room_to_record_and_no_input_runs_twice() {
    let (_turn, turns) = GatedTurns::start("disk-full-turn", "first");
    turns.fill_and_answer(0);
    assert_eq!(turns.runs(), "run\n", "the second waits for its start to be recorded");
    file_size_limit(libc::RLIM_INFINITY);
    let texts = turns.settled(4);
    assert_eq!(texts, ["User first", "User second", "Assistant first", "Assistant second"]);
    let GatedTurns { dir, engine, worker } = turns;
    drop(engine);
    let engine = open(&dir);
    let again = engine.transcript(&worker, 0, 256).expect("transcript").items;
    assert_eq!(again.len(), 4, "nothing re-run, nothing lost: {again:?}");
    assert_eq!(engine.worker(&worker).expect("the worker").activity, Some(Activity::Idle), "nothing left to run");
    assert_eq!(std::fs::read_to_string(dir.join("runs")).expect("runs"), "run\nrun\n", "each input ran once");
}

/// A worker stopped while its turn's reply waits for room: the reply is kept once there is
/// room (a stop lets the running turn finish; it was thrown away at once), and the input
/// the stop dropped never runs.
#[test]
fn a_stop_while_a_turn_waits_for_room_keeps_its_reply_and_runs_nothing_more() {
    let long = format!("first {}", "x".repeat(20_000));
    let (_turn, turns) = GatedTurns::start("disk-full-stop", &long);
    turns.fill_and_answer(2_000); // room for small records (the stop's), not the 20 kB reply
    let stopped = turns.engine.stop(&turns.worker, None).expect("stopped");
    assert_eq!(stopped.status, WorkerStatus::Stopped);
    std::thread::sleep(Duration::from_millis(300)); // the reply is tried again, and fails, meanwhile
    file_size_limit(libc::RLIM_INFINITY);
    let first = format!("{:?} {}", Role::User, &long[..20]);
    let reply = format!("{:?} {}", Role::Assistant, &long[..20]);
    assert_eq!(turns.settled(4), [first, "User second".into(), "System 1 queued input was n".into(), reply]);
    assert_eq!(turns.runs(), "run\n", "the dropped input never ran");
}

/// Interrupts sent while a turn's end waits for room were for that turn: the next input runs
/// whole (two of them used to end the next turn too, its input never run).
#[test]
fn interrupts_while_a_turn_waits_for_room_do_not_end_the_next_turn() {
    let (_turn, turns) = GatedTurns::start("disk-full-interrupts", "first");
    turns.fill_and_answer(0);
    for _ in 0..2 {
        turns.engine.interrupt(&turns.worker).expect("interrupt acknowledged");
    }
    std::thread::sleep(Duration::from_millis(300)); // the reply is tried again meanwhile
    file_size_limit(libc::RLIM_INFINITY);
    assert_eq!(turns.settled(4), ["User first", "User second", "Assistant first", "Assistant second"]);
    assert_eq!(turns.runs(), "run\nrun\n");
}
