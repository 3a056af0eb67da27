//! `runtime_id` → handle; listings answered from each handle's health, fan-out over all.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use super::errors::api_error;
use super::views::{RuntimeView, WorkerView};
use crate::runtime::handle::{HealthState, RuntimeHandle};

/// One configured runtime.
pub struct RuntimeEntry {
    /// The id browsers use.
    pub id: String,
    /// Human-readable label.
    pub label: String,
    /// The handle requests are routed to.
    pub handle: Arc<dyn RuntimeHandle>,
}

/// All configured runtimes, in configuration order.
pub struct Registry {
    entries: Vec<RuntimeEntry>,
}

/// `GET /api/workers`: every worker, plus how each runtime answered.
#[derive(Serialize)]
pub struct AllWorkers {
    items: Vec<WorkerView>,
    runtimes: Vec<Value>,
}

impl Registry {
    /// A registry over `entries` (ids are unique, checked by the config).
    pub fn new(entries: Vec<RuntimeEntry>) -> Registry {
        Registry { entries }
    }

    /// The runtime with id `runtime_id`.
    pub fn get(&self, runtime_id: &str) -> Option<&RuntimeEntry> {
        self.entries.iter().find(|e| e.id == runtime_id)
    }

    /// All runtimes.
    pub fn entries(&self) -> &[RuntimeEntry] {
        &self.entries
    }

    /// The browser view of one runtime, from its cached health.
    pub fn view(entry: &RuntimeEntry) -> RuntimeView {
        RuntimeView::new(&entry.id, &entry.label, entry.handle.kind(), entry.handle.health())
    }

    /// Asks every runtime for its workers in parallel, each within its own budget; a runtime
    /// known to be down is skipped at once with its last error. Partial results, never all-or-nothing.
    pub fn all_workers(&self) -> AllWorkers {
        let answers: Vec<(Vec<WorkerView>, Value)> = std::thread::scope(|scope| {
            let tasks: Vec<_> = self.entries.iter().map(|entry| scope.spawn(move || list_one(entry))).collect();
            tasks
                .into_iter()
                .zip(&self.entries)
                .map(|(task, entry)| {
                    task.join().unwrap_or_else(|_| {
                        let error = json!({"code": "internal", "message": "listing panicked"});
                        (Vec::new(), json!({"runtime_id": entry.id, "state": "error", "error": error}))
                    })
                })
                .collect()
        });
        let mut all = AllWorkers { items: Vec::new(), runtimes: Vec::new() };
        for (items, state) in answers {
            all.items.extend(items);
            all.runtimes.push(state);
        }
        all
    }
}

fn state_words(state: HealthState) -> &'static str {
    match state {
        HealthState::AuthFailed => "rejecting the gateway's token",
        HealthState::Incompatible => "not answering as a Runtime API",
        _ => "unreachable",
    }
}

fn list_one(entry: &RuntimeEntry) -> (Vec<WorkerView>, Value) {
    let health = entry.handle.health();
    if health.is_down() {
        let code = health.last_error.as_ref().map_or("remote_runtime_unreachable", |e| e.code);
        let message = format!("runtime `{}` is {}; skipped without asking it", entry.id, state_words(health.state));
        let error = json!({"code": code, "message": message});
        return (Vec::new(), json!({"runtime_id": entry.id, "state": "error", "error": error}));
    }
    match entry.handle.list_workers() {
        Ok(workers) => {
            let state = json!({"runtime_id": entry.id, "state": "ok", "count": workers.len()});
            (workers.into_iter().map(|w| WorkerView::from_summary(&entry.id, w)).collect(), state)
        }
        Err(e) => {
            let api = api_error(&e, &entry.id, None);
            let mut error = json!({"code": api.code, "message": api.message});
            if let Some(said) = api.extra.upstream_message {
                error["upstream_message"] = json!(said);
            }
            (Vec::new(), json!({"runtime_id": entry.id, "state": "error", "error": error}))
        }
    }
}
