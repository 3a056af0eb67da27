//! `worker-gateway check`: a smoke test of every configured runtime, for scripts and CI.
//!
//! Per runtime: reachable, authenticated, Runtime API compatible, create an `echo` worker,
//! an input round trip, the transcript, stop, delete (skipped, not failed, on a runtime
//! that does not support deleting workers). Each runtime is checked on its own thread
//! within a deadline, so a hung runtime cannot hang the check. Details come from typed
//! errors: no URL, host or token is ever printed. What a remote runtime says (its backend,
//! worker ids, error codes and messages) reaches a detail only through the remote handle,
//! which checks it as it does for browsers (`runtime::remote::text`). Embedded runtimes are
//! checked on a memory-store copy, so a running gateway's data dir is not touched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{GatewayConfig, RuntimeKindConfig};
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
    /// Every check, in order (those not reached after a failure fail with a reason).
    pub checks: Vec<Outcome>,
}

impl RuntimeReport {
    /// True when no check failed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Runs the checks of every runtime of `config` in parallel.
pub fn run(config: &GatewayConfig) -> Vec<RuntimeReport> {
    let tasks: Vec<_> = config
        .runtimes
        .iter()
        .map(|rt| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let kind = rt.kind.clone();
            std::thread::spawn(move || {
                let _ = tx.send(check_runtime(&kind));
            });
            (rt, rx)
        })
        .collect();
    let started = Instant::now();
    tasks
        .into_iter()
        .map(|(rt, rx)| {
            let kind = match rt.kind {
                RuntimeKindConfig::Embedded(_) => "embedded",
                RuntimeKindConfig::Remote(_) => "remote",
            };
            let checks = rx.recv_timeout(DEADLINE.saturating_sub(started.elapsed())).unwrap_or_else(|_| {
                vec![Outcome::fail("reachable", format!("no answer within {} s", DEADLINE.as_secs()))]
            });
            RuntimeReport { runtime_id: rt.id.clone(), kind, checks: complete(checks) }
        })
        .collect()
}

/// Fills in the checks that were not reached as failed ("skipped").
fn complete(mut checks: Vec<Outcome>) -> Vec<Outcome> {
    for name in CHECKS.iter().skip(checks.len()) {
        checks.push(Outcome::fail(name, "skipped: an earlier check failed".into()));
    }
    checks
}

fn check_runtime(kind: &RuntimeKindConfig) -> Vec<Outcome> {
    let handle: Arc<dyn RuntimeHandle> = match kind {
        RuntimeKindConfig::Embedded(options) => {
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
    match handle.summary() {
        Ok(summary) => {
            out.push(pass("reachable", "answered".into()));
            out.push(pass("authenticated", "token accepted".into()));
            out.push(pass("compatible", format!("Runtime API, backend {}", summary.backend)));
        }
        Err(e @ (RuntimeError::Unreachable(_) | RuntimeError::Timeout(_))) => return vec![fail("reachable", &e)],
        Err(e @ RuntimeError::AuthFailed) => {
            return vec![pass("reachable", "answered".into()), fail("authenticated", &e)];
        }
        Err(e) => {
            return vec![
                pass("reachable", "answered".into()),
                pass("authenticated", "not refused".into()),
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
    let started = Instant::now();
    let input = WorkerInput { kind: InputKind::User, content: "check".into(), idempotency_key: None };
    if let Err(e) = handle.input(&worker, input) {
        return [out, vec![fail("round_trip", &e)]].concat();
    }
    let finished = loop {
        match handle.worker(&worker) {
            Ok(w) if w.transcript_len >= 2 && w.activity != Some(Activity::Busy) => break Ok(()),
            Ok(_) if started.elapsed() > Duration::from_secs(10) => break Err("no answer within 10 s".to_owned()),
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    match finished {
        Ok(()) => {
            out.push(pass("round_trip", format!("answered in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0)))
        }
        Err(detail) => return [out, vec![Outcome::fail("round_trip", detail)]].concat(),
    }
    match handle.transcript(&worker, 0, 10) {
        Ok(t) if t.items.iter().any(|i| i.author() == Role::Assistant && i.content == "check") => {
            out.push(pass("transcript", format!("{} entries, echo present", t.total_items)))
        }
        Ok(_) => out.push(Outcome::fail("transcript", "the echo is missing".into())),
        Err(e) => out.push(fail("transcript", &e)),
    }
    match handle.stop(&worker, Some("worker-gateway check".into())) {
        Ok(ack) if ack.status != WorkerStatus::Running => {
            out.push(pass("stop", format!("worker {}", ack.status.as_str())))
        }
        Ok(_) => return [out, vec![Outcome::fail("stop", "still running".into())]].concat(),
        Err(e) => return [out, vec![fail("stop", &e)]].concat(),
    }
    out.push(delete(handle.as_ref(), &worker));
    out
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

/// The reports as a text table.
pub fn table(reports: &[RuntimeReport]) -> String {
    let mut text = format!("{:<16} {:<9} {:<14} {:<6} detail\n", "runtime", "kind", "check", "result");
    for r in reports {
        for c in &r.checks {
            let result = match (c.ok, c.skipped) {
                (true, true) => "SKIP",
                (true, false) => "ok",
                (false, _) => "FAIL",
            };
            text.push_str(&format!("{:<16} {:<9} {:<14} {:<6} {}\n", r.runtime_id, r.kind, c.name, result, c.detail));
        }
    }
    text
}
