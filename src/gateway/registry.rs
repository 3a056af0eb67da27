//! `runtime_id` → handle; listings answered from each handle's health, fan-out over all.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::{Value, json};

use super::errors::api_error;
use super::views::{RuntimeView, WorkerView};
use crate::pool::{Limits, Pool};
use crate::runtime::handle::{HealthState, RuntimeHandle, RuntimeKind};

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
    /// Per entry, the listing call in flight to it.
    flights: Vec<Arc<Flight>>,
    listing: Pool<Call>,
}

/// How long `GET /api/workers` waits for the runtimes. One that has not answered by then
/// is listed as not answering; its call goes on, bounded by its own budget and bulkhead.
pub const LISTING_BUDGET: Duration = Duration::from_secs(2);

/// Runtimes a listing asks at once. A call that has taken [`SLOW_CALL`] no longer counts,
/// so slow or hung runtimes delay only themselves: a runtime is asked once at a time, so
/// its hung call holds one thread (until its budget ends it, or its probe marks it down
/// and listings skip it).
const LISTING_AT_ONCE: usize = 16;

/// A listing call running this long counts as slow (see [`LISTING_AT_ONCE`]).
const SLOW_CALL: Duration = Duration::from_millis(200);

/// What one runtime's listing gave: its workers and how it answered.
struct Listed {
    items: Vec<WorkerView>,
    state: Value,
}

/// The listing of the entry at an index.
type Answer = (usize, Arc<Listed>);

/// One runtime's listing calls.
#[derive(Default)]
struct Flight {
    /// The listings waiting for the call in flight (`None`: no call in flight).
    waiting: Mutex<Option<Vec<Sender<Answer>>>>,
    /// How long its last call took, in microseconds: listings ask the quickest first.
    took_us: std::sync::atomic::AtomicU64,
}

/// One runtime to ask for its workers, on the listing pool.
struct Call {
    index: usize,
    id: String,
    handle: Arc<dyn RuntimeHandle>,
    flight: Arc<Flight>,
}

/// `GET /api/workers`: every worker, plus how each runtime answered.
pub struct AllWorkers {
    listed: Vec<Arc<Listed>>,
}

impl Serialize for AllWorkers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Items<'a>(&'a [Arc<Listed>]);
        impl Serialize for Items<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.iter().flat_map(|listed| &listed.items))
            }
        }
        let mut all = serializer.serialize_struct("AllWorkers", 2)?;
        all.serialize_field("items", &Items(&self.listed))?;
        all.serialize_field("runtimes", &self.listed.iter().map(|listed| &listed.state).collect::<Vec<_>>())?;
        all.end()
    }
}

impl Registry {
    /// A registry over `entries` (ids are unique, checked by the config).
    pub fn new(entries: Vec<RuntimeEntry>) -> Registry {
        let flights = entries.iter().map(|_| Arc::default()).collect();
        // At most one call per runtime is in flight, so at most one thread each.
        let max_threads = entries.len().max(LISTING_AT_ONCE);
        let limits = Limits { max_threads, keep: 0, queue: 65_536, idle: Duration::from_secs(5) };
        Registry { entries, flights, listing: Pool::new("list", limits, Call::run) }
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

    /// Asks every runtime for its workers, [`LISTING_AT_ONCE`] quick calls at once (the
    /// quickest last time first), within [`LISTING_BUDGET`] in all; a runtime known to be
    /// down is skipped at once with its last error, and a runtime already being asked by
    /// another listing is not asked twice (both get that answer). Partial results, never
    /// all-or-nothing; a runtime not answered says whether it was asked.
    pub fn all_workers(&self) -> AllWorkers {
        let deadline = Instant::now() + LISTING_BUDGET;
        let (tx, answers) = bounded(self.entries.len());
        let mut listed: Vec<Option<Arc<Listed>>> = self.entries.iter().map(skipped).collect();
        // The runtimes this listing asks itself; for the others it joins the call in flight.
        let mut to_ask = Vec::new();
        for index in (0..self.entries.len()).filter(|i| listed[*i].is_none()) {
            let mut waiting = self.flights[index].waiting.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.as_mut() {
                Some(waiting) => waiting.push(tx.clone()),
                None => {
                    *waiting = Some(vec![tx.clone()]);
                    to_ask.push(index);
                }
            }
        }
        drop(tx);
        // Embedded runtimes first (they answer at once), then the quickest last time.
        to_ask.sort_by_key(|index| {
            let remote = self.entries[*index].handle.kind() != RuntimeKind::Embedded;
            (remote, self.flights[*index].took_us.load(Ordering::Relaxed))
        });
        let mut to_ask = to_ask.into_iter();
        let mut asked: Vec<(usize, Instant)> = Vec::new();
        let mut unanswered = listed.iter().filter(|l| l.is_none()).count();
        while unanswered > 0 {
            let now = Instant::now();
            let quick = asked.iter().filter(|(_, at)| now - *at < SLOW_CALL).count();
            for index in to_ask.by_ref().take(LISTING_AT_ONCE.saturating_sub(quick)) {
                self.ask(index);
                asked.push((index, now));
            }
            match answers.recv_deadline(deadline.min(now + SLOW_CALL / 4)) {
                Ok((index, answer)) => {
                    asked.retain(|(i, _)| *i != index);
                    if listed[index].replace(answer).is_none() {
                        unanswered -= 1;
                    }
                }
                Err(_) if Instant::now() < deadline => {}
                Err(_) => break,
            }
        }
        let budget = LISTING_BUDGET.as_millis();
        for index in to_ask {
            // Never asked: its flight ends here, for this listing and any that joined it.
            let id = &self.entries[index].id;
            let message = format!(
                "runtime `{id}` was not asked within {budget} ms: slower runtimes took the time; retry shortly"
            );
            let not_asked = Arc::new(failed(id, json!({"code": "overloaded", "message": message})));
            listed[index] = Some(not_asked.clone());
            Call::answer_flight(&self.flights[index], index, not_asked);
        }
        let listed = listed
            .into_iter()
            .zip(&self.entries)
            .map(|(answer, entry)| {
                answer.unwrap_or_else(|| {
                    let message =
                        format!("runtime `{}` did not answer within {budget} ms; listed without its workers", entry.id);
                    Arc::new(failed(&entry.id, json!({"code": "remote_runtime_timeout", "message": message})))
                })
            })
            .collect();
        AllWorkers { listed }
    }

    /// Starts the listing call to the runtime at `index` (its flight is open).
    fn ask(&self, index: usize) {
        let entry = &self.entries[index];
        let flight = self.flights[index].clone();
        let call = Call { index, id: entry.id.clone(), handle: entry.handle.clone(), flight };
        if let Err(call) = self.listing.submit(call) {
            let busy = json!({"code": "overloaded", "message": "too many listings at once; retry shortly"});
            call.answer(Arc::new(failed(&entry.id, busy)));
        }
    }
}

impl Call {
    fn run(self) {
        let started = Instant::now();
        let listed = catch_unwind(AssertUnwindSafe(|| list_one(&self.id, self.handle.as_ref())))
            .unwrap_or_else(|_| failed(&self.id, json!({"code": "internal", "message": "listing panicked"})));
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.flight.took_us.store(took, Ordering::Relaxed);
        self.answer(Arc::new(listed));
    }

    fn answer(&self, listed: Arc<Listed>) {
        Call::answer_flight(&self.flight, self.index, listed);
    }

    /// Gives `listed` to every listing waiting on `flight`; the next listing asks anew.
    fn answer_flight(flight: &Flight, index: usize, listed: Arc<Listed>) {
        let waiting = flight.waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
        for listing in waiting.into_iter().flatten() {
            let _ = listing.try_send((index, listed.clone())); // gone: it stopped waiting
        }
    }
}

fn failed(runtime_id: &str, error: Value) -> Listed {
    Listed { items: Vec::new(), state: json!({"runtime_id": runtime_id, "state": "error", "error": error}) }
}

/// How a runtime that is down is down, in words that agree with its error's code.
fn state_words(state: HealthState, code: &str) -> &'static str {
    match (state, code) {
        (HealthState::AuthFailed, _) => "refusing the gateway (its token for it is missing or wrong)",
        (HealthState::Incompatible, _) => "not answering as a Runtime API",
        (_, "remote_runtime_timeout") => "not answering in time",
        (_, "runtime_stopped") => "shutting down",
        _ => "unreachable",
    }
}

/// A runtime known to be down: skipped without asking it, with its last error.
fn skipped(entry: &RuntimeEntry) -> Option<Arc<Listed>> {
    let health = entry.handle.health();
    if !health.is_down() {
        return None;
    }
    let code = health.last_error.as_ref().map_or("remote_runtime_unreachable", |e| e.code);
    let message = format!("runtime `{}` is {}; skipped without asking it", entry.id, state_words(health.state, code));
    Some(Arc::new(failed(&entry.id, json!({"code": code, "message": message}))))
}

fn list_one(runtime_id: &str, handle: &dyn RuntimeHandle) -> Listed {
    match handle.list_workers() {
        Ok(workers) => {
            let state = json!({"runtime_id": runtime_id, "state": "ok", "count": workers.len()});
            Listed { items: workers.into_iter().map(|w| WorkerView::from_summary(runtime_id, w)).collect(), state }
        }
        Err(e) => {
            let api = api_error(&e, runtime_id, None);
            let mut error = json!({"code": api.code, "message": api.message});
            if let Some(said) = api.extra.upstream_message {
                error["upstream_message"] = json!(said);
            }
            failed(runtime_id, error)
        }
    }
}
