//! `worker-gateway check`: a smoke test of every configured runtime, for scripts and CI.
//!
//! Per runtime: reachable, authenticated, Runtime API compatible, create an `echo` worker,
//! an input round trip, the transcript, stop, delete. A step that does not apply (the token
//! of an embedded runtime, DELETE on a runtime without it) or that was not reached after a
//! failure is skipped, not failed. Each runtime is checked on its own thread within a
//! deadline, so a hung runtime cannot hang the check, and one that fails (a wrong or missing
//! token) does not stop the others. Details come from typed
//! errors: no URL, host or token is ever printed. What a remote runtime says (its backend,
//! worker ids, error codes and messages) reaches a detail only through the remote handle,
//! which checks it as it does for browsers (`runtime::remote::text`). Embedded runtimes are
//! checked on a memory-store copy, so a running gateway's data dir is not touched.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{GatewayConfig, RuntimeConfig, RuntimeKindConfig};
use crate::runtime::engine::{Engine, StoreKind};
use crate::runtime::handle::{RuntimeError, RuntimeHandle};
use crate::runtime::remote::RemoteRuntime;
use crate::runtime::types::{
    Activity, CreateExtras, CreateWorker, InputKind, Intent, ProfileRef, Role, WorkerInput, WorkerStatus,
};

/// How long one runtime's checks may take in all.
const DEADLINE: Duration = Duration::from_secs(30);

/// The names of the checks, in order.
const CHECKS: [&str; 8] =
    ["reachable", "authenticated", "compatible", "create", "round_trip", "transcript", "stop", "delete"];

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Which check.
    pub name: &'static str,
    /// Passed? (A skipped check did not fail: it is `ok` and `skipped`.)
    pub ok: bool,
    /// The runtime does not support this step, so it was not run.
    pub skipped: bool,
    /// What happened, in words.
    pub detail: String,
}

impl Outcome {
    fn pass(name: &'static str, detail: String) -> Outcome {
        Outcome { name, ok: true, skipped: false, detail }
    }

    fn fail(name: &'static str, detail: String) -> Outcome {
        Outcome { name, ok: false, skipped: false, detail }
    }

    fn skip(name: &'static str, detail: String) -> Outcome {
        Outcome { name, ok: true, skipped: true, detail }
    }
}

/// All checks of one runtime.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeReport {
    /// The runtime's id.
    pub runtime_id: String,
    /// `embedded` | `remote`.
    pub kind: &'static str,
    /// True when none of its checks failed.
    pub ok: bool,
    /// Every check, in order (those not reached after a failure are skipped, with a reason).
    pub checks: Vec<Outcome>,
}

/// What `check` found: for scripts (as JSON) and people (as a table, [`Report::table`]).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when no check of any runtime failed.
    pub ok: bool,
    /// How many runtimes passed and failed.
    pub summary: Summary,
    /// Every runtime, in configuration order.
    pub runtimes: Vec<RuntimeReport>,
}

/// Runtimes checked, passed and failed: the last line of the table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// Runtimes checked.
    pub runtimes: usize,
    /// Runtimes none of whose checks failed.
    pub ok: usize,
    /// Runtimes with a failed check.
    pub failed: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.runtimes == 1 { "" } else { "s" };
        write!(f, "{} runtime{plural}: {} ok, {} failed", self.runtimes, self.ok, self.failed)
    }
}

/// Runs the checks of every runtime of `config` in parallel.
pub fn run(config: &GatewayConfig) -> Report {
    let tasks: Vec<_> = config
        .runtimes
        .iter()
        .map(|rt| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let runtime = rt.clone();
            std::thread::spawn(move || {
                let _ = tx.send(check_runtime(&runtime));
            });
            (rt, rx)
        })
        .collect();
    let started = Instant::now();
    let runtimes: Vec<RuntimeReport> = tasks
        .into_iter()
        .map(|(rt, rx)| {
            let kind = match rt.kind {
                RuntimeKindConfig::Embedded(_) => "embedded",
                RuntimeKindConfig::Remote(_) => "remote",
            };
            let checks = rx.recv_timeout(DEADLINE.saturating_sub(started.elapsed())).unwrap_or_else(|_| {
                vec![Outcome::fail("reachable", format!("no answer within {} s", DEADLINE.as_secs()))]
            });
            let checks = complete(checks);
            RuntimeReport { runtime_id: rt.id.clone(), kind, ok: checks.iter().all(|c| c.ok), checks }
        })
        .collect();
    let ok = runtimes.iter().filter(|r| r.ok).count();
    let summary = Summary { runtimes: runtimes.len(), ok, failed: runtimes.len() - ok };
    Report { ok: summary.failed == 0, summary, runtimes }
}

/// Lists the checks that were not reached after a failure as skipped.
fn complete(mut checks: Vec<Outcome>) -> Vec<Outcome> {
    for name in CHECKS.iter().skip(checks.len()) {
        checks.push(Outcome::skip(name, "not run: an earlier check failed".into()));
    }
    checks
}

/// Why an embedded runtime could not keep its state in `dir`, found without touching it (a
/// running gateway may be using it): it, or the folder it would be made in, is not a folder
/// this user can write to.
fn data_dir_problem(dir: &Path) -> Option<String> {
    let workers = dir.join("workers");
    let nearest = [workers.as_path()]
        .into_iter()
        .chain(dir.ancestors())
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        .find(|d| d.exists() || std::fs::symlink_metadata(d).is_ok())?;
    let shown = nearest.display();
    if !nearest.is_dir() {
        return Some(format!("{shown} is not a folder"));
    }
    let path = std::ffi::CString::new(nearest.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a NUL-terminated string that lives across the call.
    let writable = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    (!writable).then(|| format!("cannot write to {shown} ({})", std::io::Error::last_os_error()))
}

fn check_runtime(runtime: &RuntimeConfig) -> Vec<Outcome> {
    let handle: Arc<dyn RuntimeHandle> = match &runtime.kind {
        RuntimeKindConfig::Embedded(options) => {
            if let StoreKind::Fs(dir) = &options.store
                && let Some(problem) = data_dir_problem(dir)
            {
                return vec![Outcome::fail("reachable", format!("its data_dir would stop `serve`: {problem}"))];
            }
            let mut options = options.clone();
            options.store = StoreKind::Memory;
            match Engine::open(options) {
                Ok(engine) => Arc::new(engine),
                Err(e) => return vec![Outcome::fail("reachable", format!("{e:#}"))],
            }
        }
        RuntimeKindConfig::Remote(options) => Arc::new(RemoteRuntime::start(options.clone())),
    };
    let mut out = Vec::new();
    let pass = Outcome::pass;
    let fail = |name, e: &RuntimeError| Outcome::fail(name, e.to_string());
    let token = match (&runtime.kind, &runtime.token_problem) {
        (RuntimeKindConfig::Embedded(_), _) => None,
        (RuntimeKindConfig::Remote(_), Some(problem)) => Some(Err(problem)),
        (RuntimeKindConfig::Remote(options), None) => Some(Ok(options.token.is_some())),
    };
    match handle.summary() {
        Ok(summary) => match token {
            None => {
                out.push(pass("reachable", "in process".into()));
                out.push(Outcome::skip("authenticated", "in process: no token involved".into()));
                out.push(pass("compatible", "the in-process engine (checked on a memory copy)".into()));
            }
            Some(token) => {
                out.push(pass("reachable", "answered".into()));
                out.push(pass("authenticated", authenticated(token)));
                out.push(pass("compatible", format!("Runtime API, backend {}", summary.backend)));
            }
        },
        Err(e @ (RuntimeError::Unreachable(_) | RuntimeError::Timeout(_))) => {
            let mut out = vec![fail("reachable", &e)];
            // Known without the runtime: the token it would need is missing here too.
            if let Some(Err(problem)) = token {
                out.push(Outcome::fail("authenticated", format!("not tried, and the gateway has no token: {problem}")));
            }
            return out;
        }
        Err(e @ RuntimeError::AuthFailed) => {
            let detail = match token {
                Some(Err(problem)) => format!("the runtime refused the gateway, which has no token for it: {problem}"),
                _ => e.to_string(),
            };
            return vec![pass("reachable", "answered".into()), Outcome::fail("authenticated", detail)];
        }
        Err(e) => {
            return vec![
                pass("reachable", "answered".into()),
                Outcome::skip("authenticated", "unknown: the answer was not the Runtime API's".into()),
                fail("compatible", &e),
            ];
        }
    }
    let create = CreateWorker {
        intent: Intent::Task { objective: "worker-gateway check".into() },
        profile: ProfileRef::Named("echo".into()),
        extras: CreateExtras::default(),
        idempotency_key: None,
    };
    let worker = match handle.create_worker(create) {
        Ok(w) => w.worker_id,
        Err(e) => return [out, vec![fail("create", &e)]].concat(),
    };
    out.push(pass("create", format!("created {worker}")));
    if exercise(handle.as_ref(), &worker, &mut out) {
        out.push(delete(handle.as_ref(), &worker));
        return out;
    }
    // A failed step leaves nothing behind either: the worker's turn ends now, and it goes.
    let cancelled = handle.cancel(&worker, Some("worker-gateway check".into()));
    let removed = delete(handle.as_ref(), &worker);
    if let (Some(failed), false) = (out.last_mut(), removed.ok && !removed.skipped) {
        let cancel = match cancelled {
            Ok(_) => "it was cancelled".to_owned(),
            Err(e) => format!("cancelling it failed too ({e})"),
        };
        failed
            .detail
            .push_str(&format!("; the check's worker {worker} is left behind: {cancel}, and {}", removed.detail));
    }
    out
}

/// The steps on the check's worker `worker` after its create: an input and its answer, the
/// transcript, a stop. True when they all passed; a failed one ends them (its outcome last).
fn exercise(handle: &dyn RuntimeHandle, worker: &str, out: &mut Vec<Outcome>) -> bool {
    let fail = |name, e: &RuntimeError| Outcome::fail(name, e.to_string());
    let started = Instant::now();
    let input = WorkerInput { kind: InputKind::User, content: "check".into(), idempotency_key: None };
    if let Err(e) = handle.input(worker, input) {
        out.push(fail("round_trip", &e));
        return false;
    }
    // Polled from 1 ms on, the pause doubling up to 50 ms: the time said is the answer's,
    // not a multiple of the pause.
    let mut pause = Duration::from_millis(1);
    let finished = loop {
        match handle.worker(worker) {
            Ok(w) if w.transcript_len >= 2 && w.activity != Some(Activity::Busy) => break Ok(()),
            Ok(_) if started.elapsed() > Duration::from_secs(10) => break Err("no answer within 10 s".to_owned()),
            Ok(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    match finished {
        Ok(()) => out.push(Outcome::pass(
            "round_trip",
            format!("answered in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0),
        )),
        Err(detail) => {
            out.push(Outcome::fail("round_trip", detail));
            return false;
        }
    }
    match handle.transcript(worker, 0, 10) {
        Ok(t) if t.items.iter().any(|i| i.author() == Role::Assistant && i.content == "check") => {
            out.push(Outcome::pass("transcript", format!("{} entries, echo present", t.total_items)))
        }
        Ok(_) => out.push(Outcome::fail("transcript", "the echo is missing".into())),
        Err(e) => out.push(fail("transcript", &e)),
    }
    let stopped = match handle.stop(worker, Some("worker-gateway check".into())) {
        Ok(ack) if ack.status != WorkerStatus::Running => {
            Outcome::pass("stop", format!("worker {}", ack.status.as_str()))
        }
        Ok(_) => Outcome::fail("stop", "still running".into()),
        Err(e) => fail("stop", &e),
    };
    let ok = stopped.ok;
    out.push(stopped);
    ok
}

/// What the `authenticated` step says when the runtime answered: whether the gateway sent a
/// token (`Ok`), or why it had none to send (`Err`).
fn authenticated(token: Result<bool, &String>) -> String {
    match token {
        Ok(true) => "token accepted".into(),
        Ok(false) => "no token configured, none required".into(),
        Err(problem) => format!("answered without a token, but the config names one: {problem}"),
    }
}

/// Deletes the check's worker and makes sure it is gone. A runtime without DELETE (it
/// answers 405/501, as older runtimes do) skips the step instead of failing it.
fn delete(handle: &dyn RuntimeHandle, worker: &str) -> Outcome {
    let started = Instant::now();
    loop {
        match handle.delete(worker) {
            Ok(()) => break,
            // The stopped worker may still be ending its turn (within its stop grace).
            Err(e) if still_running(&e) && started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(RuntimeError::Unsupported) => {
                return Outcome::skip("delete", "the runtime does not support deleting workers (405/501)".into());
            }
            Err(e) => return Outcome::fail("delete", e.to_string()),
        }
    }
    match handle.worker(worker) {
        Err(RuntimeError::WorkerNotFound) => Outcome::pass("delete", format!("deleted {worker}")),
        Ok(_) => Outcome::fail("delete", "the worker is still listed after its deletion".into()),
        Err(e) => Outcome::fail("delete", format!("deleted, but reading it back failed: {e}")),
    }
}

/// True for `worker_running`, whether the runtime is embedded or remote.
fn still_running(error: &RuntimeError) -> bool {
    match error {
        RuntimeError::WorkerRunning => true,
        RuntimeError::Rejected { error, .. } => still_running(error),
        _ => false,
    }
}

impl Report {
    /// The report as a text table, one row per check, and the summary line.
    pub fn table(&self) -> String {
        let width = self.runtimes.iter().map(|r| r.runtime_id.len()).max().unwrap_or(0).max("runtime".len());
        let mut text = format!("{:<width$}  {:<8}  {:<13}  {:<6}  detail\n", "runtime", "kind", "check", "result");
        for r in &self.runtimes {
            for c in &r.checks {
                let result = match (c.ok, c.skipped) {
                    (true, true) => "SKIP",
                    (true, false) => "ok",
                    (false, _) => "FAIL",
                };
                let row =
                    format!("{:<width$}  {:<8}  {:<13}  {:<6}  {}", r.runtime_id, r.kind, c.name, result, c.detail);
                text.push_str(row.trim_end());
                text.push('\n');
            }
        }
        text.push_str(&format!("{}\n", self.summary));
        text
    }
}
