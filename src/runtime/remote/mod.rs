//! `RemoteRuntime`: the `RuntimeHandle` of a runtime process reached over the Runtime API.
//!
//! One ureq agent per runtime (connections reused), a budget per operation class, a cap on
//! requests in flight (the bulkhead), and health probes on the process's probe schedule
//! keeping the health that listings read. The base URL and token never leave this module: `Debug` redacts both and
//! errors carry only kinds. What the runtime itself says (ids, codes, messages) is checked by
//! [`text::PrivateText`] before anything else sees it.

mod client;
mod events;
mod health;
mod probes;
pub mod resolver;
pub mod text;
pub use events::large_frames_wanted;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;

use crate::runtime::handle::{
    EventSource, Health, RuntimeError, RuntimeHandle, RuntimeKind, RuntimeResult, entries_within_page_bytes,
};
use crate::runtime::types::{
    CreateWorker, InputAck, LifecycleAck, RuntimeSummary, Transcript, WorkerDetail, WorkerInput, WorkerRef,
    WorkerStatus, WorkerSummary,
};
use crate::secret::Secret;
use crate::tls::client::ClientTls;
use client::{Client, Operation};
use health::HealthTracker;
use text::PrivateText;

/// Characters left as they are in a worker id path segment.
const ID_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b':');

/// Settings of one remote runtime.
#[derive(Clone)]
pub struct RemoteOptions {
    /// The gateway's id for it (used in messages).
    pub runtime_id: String,
    /// `http(s)://host:port[/prefix]`; backend-private.
    pub base_url: String,
    /// Bearer token sent on every request.
    pub token: Option<Secret>,
    /// What an `https://` runtime's certificate must chain to (`None` for `http://`).
    pub tls: Option<ClientTls>,
    /// TCP (+TLS) connect budget.
    pub connect_timeout: Duration,
    /// Whole-call budget of reads (runtime, workers, worker, transcript).
    pub read_timeout: Duration,
    /// Whole-call budget of writes (create, input, stop, cancel).
    pub write_timeout: Duration,
    /// Whole-call budget of a health probe.
    pub probe_timeout: Duration,
    /// Time between probes.
    pub probe_interval: Duration,
    /// An event stream silent this long (no data, no pong) is dead and reconnected; it is
    /// pinged after a third of it.
    pub event_silence: Duration,
    /// Requests in flight at once; past it → `overloaded`.
    pub max_in_flight: usize,
    /// Connections kept open to it between calls, at most (0: each call has its own): the
    /// gateway lowers it so that idle connections to all its runtimes fit its open-file
    /// limit.
    pub max_idle_connections: usize,
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("runtime_id", &self.runtime_id)
            .field("base_url", &"<backend-private>")
            .field("token", &self.token)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("probe_timeout", &self.probe_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("event_silence", &self.event_silence)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_idle_connections", &self.max_idle_connections)
            .finish()
    }
}

struct Shared {
    options: RemoteOptions,
    client: Client,
    health: HealthTracker,
    in_flight: AtomicUsize,
    private: Arc<PrivateText>,
    errors: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// When rows left out of a listing were last logged (a dashboard lists every 3 s).
    rows_told: std::sync::Mutex<Option<Instant>>,
}

/// A remote runtime handle. Dropping it ends its probes.
pub struct RemoteRuntime {
    shared: Arc<Shared>,
}

impl fmt::Debug for RemoteRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteRuntime").field("options", &self.shared.options).finish_non_exhaustive()
    }
}

/// Releases a bulkhead slot when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RemoteRuntime {
    /// Creates the handle and puts it on the probe schedule (first probe within a second). An
    /// `https://` runtime without TLS settings trusts the system trust store.
    pub fn start(mut options: RemoteOptions) -> RemoteRuntime {
        if options.tls.is_none() && options.base_url.starts_with("https://") {
            options.tls = Some(ClientTls::new(crate::tls::client::Trust::System));
        }
        let private = Arc::new(PrivateText::new(&options.base_url, options.token.as_ref()));
        let client = Client::new(&options, private.clone());
        let health = HealthTracker::new(&options.runtime_id, options.probe_timeout / 2);
        let shared = Arc::new(Shared {
            options,
            client,
            health,
            in_flight: AtomicUsize::new(0),
            private,
            errors: Default::default(),
            rows_told: Default::default(),
        });
        let probed: Weak<dyn probes::Probed> = Arc::downgrade(&shared) as Weak<Shared>;
        probes::schedule(probed, shared.options.probe_interval);
        RemoteRuntime { shared }
    }

    /// Runs `call` inside the bulkhead and feeds its outcome to the health tracker. One
    /// operation the runtime does not support (405/501, e.g. DELETE on an older runtime) says
    /// nothing about its health: the probe alone judges whether it speaks the Runtime API.
    fn guarded<T>(&self, call: impl FnOnce(&Client, &RemoteOptions) -> RuntimeResult<T>) -> RuntimeResult<T> {
        let shared = &self.shared;
        if shared.in_flight.fetch_add(1, Ordering::SeqCst) >= shared.options.max_in_flight {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::Overloaded);
        }
        let _slot = Slot(&shared.in_flight);
        let result = call(&shared.client, &shared.options);
        match &result {
            Ok(_) => shared.health.request_ok(),
            Err(e) => {
                if *e != RuntimeError::Unsupported {
                    shared.health.failed(e);
                }
                *shared.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(e.gateway_status().1).or_default() += 1;
            }
        }
        result
    }

    fn read<T: serde::de::DeserializeOwned>(&self, path: &str, key: &str) -> RuntimeResult<T> {
        self.guarded(|client, o| client.call("GET", path, None, key, o.read_timeout, Operation::Read))
    }

    fn end(&self, worker_id: &str, action: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        let body = match reason {
            Some(reason) => json!({ "reason": reason }),
            None => json!({}),
        };
        let path = format!("{}/{action}", worker_path(worker_id));
        let mut ack: LifecycleAck = self.guarded(|client, o| {
            client.call("POST", &path, Some(&body), "ack", o.write_timeout, Operation::Lifecycle)
        })?;
        self.own_answer(worker_id, [&mut ack.worker_ref], false);
        Ok(ack)
    }

    /// Makes the worker references of an answer about worker `asked` name it, and checks
    /// their runtime ids like every remote identifier. True when one named another worker
    /// (or something the gateway will not show).
    fn own_refs<'r>(&self, asked: &str, refs: impl IntoIterator<Item = &'r mut WorkerRef>) -> bool {
        let mut other = false;
        for worker_ref in refs {
            if worker_ref.worker_id != asked {
                other = true;
                worker_ref.worker_id = asked.to_owned();
            }
            worker_ref.runtime_id = self.shared.private.id_or_withheld(&worker_ref.runtime_id);
        }
        other
    }

    /// [`RemoteRuntime::own_refs`], and a warning (without the remote's text) when the
    /// answer named another worker: it is shown under the id asked for.
    fn own_answer<'r>(&self, asked: &str, refs: impl IntoIterator<Item = &'r mut WorkerRef>, other: bool) {
        if self.own_refs(asked, refs) || other {
            log::warn!(
                "runtime `{}`: an answer about worker `{asked}` named another worker; shown as `{asked}`",
                self.shared.options.runtime_id
            );
        }
    }

    /// A worker's detail with its identity and profile checked (see [`RemoteRuntime::own_answer`]).
    fn own_detail(&self, asked: &str, mut detail: WorkerDetail) -> WorkerDetail {
        let other = detail.worker_id != asked;
        detail.worker_id = asked.to_owned();
        detail.runtime_id = self.shared.private.id_or_withheld(&detail.runtime_id);
        self.own_answer(asked, [&mut detail.worker_ref], other);
        self.shared.private.clean_profile(&mut detail.profile);
        text::keep_timestamp(&mut detail.created_at);
        text::keep_timestamp(&mut detail.last_activity_at);
        detail
    }
}

fn worker_path(worker_id: &str) -> String {
    format!("/v1/workers/{}", utf8_percent_encode(worker_id, ID_SEGMENT))
}

impl probes::Probed for Shared {
    fn probe(&self) -> Duration {
        let started = Instant::now();
        let answer: RuntimeResult<RuntimeSummary> =
            self.client.call("GET", "/v1/runtime", None, "runtime", self.options.probe_timeout, Operation::Read);
        match answer {
            Ok(summary) => self.health.probe_ok(started.elapsed(), self.private.clean_summary(summary)),
            // The gateway itself was out of descriptors: nothing learnt of the runtime.
            Err(RuntimeError::Overloaded) => {}
            Err(e) => {
                log::debug!("runtime `{}`: probe failed: {e}", self.options.runtime_id);
                self.health.probe_failed(&e);
            }
        }
        self.options.probe_interval
    }
}

impl RuntimeHandle for RemoteRuntime {
    fn summary(&self) -> RuntimeResult<RuntimeSummary> {
        Ok(self.shared.private.clean_summary(self.read("/v1/runtime", "runtime")?))
    }

    fn list_workers(&self) -> RuntimeResult<Vec<WorkerSummary>> {
        // Row by row: one the gateway cannot read (a status it does not know) is left out,
        // not the whole listing.
        let rows: Vec<Box<serde_json::value::RawValue>> = self.read("/v1/workers", "workers")?;
        let count = rows.len();
        let workers: Vec<WorkerSummary> =
            rows.into_iter().filter_map(|row| serde_json::from_str(row.get()).ok()).collect();
        let workers = self.shared.private.clean_workers(workers);
        if workers.len() < count {
            // Once a minute at most: the same rows come back with every listing.
            let mut told = self.shared.rows_told.lock().unwrap_or_else(|p| p.into_inner());
            if told.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                *told = Some(Instant::now());
                log::warn!(
                    "runtime `{}`: left out {} worker rows the gateway cannot read or show (a status it does not \
                     know, an id it cannot use)",
                    self.shared.options.runtime_id,
                    count - workers.len()
                );
            }
        }
        Ok(workers)
    }

    fn create_worker(&self, request: CreateWorker) -> RuntimeResult<WorkerDetail> {
        let body = serde_json::to_value(&request).map_err(|e| RuntimeError::InvalidRequest(e.to_string()))?;
        let create = Operation::Create(request.idempotency_key.as_deref());
        let detail = self.guarded(|client, o| {
            let detail: WorkerDetail =
                client.call("POST", "/v1/workers", Some(&body), "worker", o.write_timeout, create)?;
            if self.shared.private.allows(&detail.worker_id) {
                Ok(detail)
            } else {
                let unshowable = RuntimeError::Malformed("the new worker's id is not one the gateway can show".into());
                Err(RuntimeError::MaybeApplied(Box::new(unshowable)))
            }
        })?;
        let id = detail.worker_id.clone();
        Ok(self.own_detail(&id, detail))
    }

    fn worker(&self, worker_id: &str) -> RuntimeResult<WorkerDetail> {
        Ok(self.own_detail(worker_id, self.read(&worker_path(worker_id), "worker")?))
    }

    fn input(&self, worker_id: &str, input: WorkerInput) -> RuntimeResult<InputAck> {
        if input.content.trim().is_empty() {
            return Err(RuntimeError::InvalidRequest("input content is blank".into()));
        }
        let body = json!({ "kind": input.kind, "content": input.content });
        let path = format!("{}/input", worker_path(worker_id));
        let operation = Operation::Input(input.idempotency_key.as_deref());
        let result: RuntimeResult<InputAck> =
            self.guarded(|client, o| client.call("POST", &path, Some(&body), "ack", o.write_timeout, operation));
        match result {
            Ok(mut ack) => {
                self.own_answer(worker_id, [&mut ack.worker_ref], false);
                Ok(ack)
            }
            // A 400 `invalid_request` on input: "not running" only if the worker says so, and
            // gone if it went meanwhile (a delete racing the input).
            Err(RuntimeError::Rejected { error, upstream_code, upstream_message })
                if matches!(*error, RuntimeError::WorkerNotRunning(_)) =>
            {
                let error = match self.worker(worker_id) {
                    Ok(worker) if worker.status != WorkerStatus::Running => {
                        RuntimeError::WorkerNotRunning(worker.status)
                    }
                    Err(RuntimeError::WorkerNotFound) => RuntimeError::WorkerNotFound,
                    _ => RuntimeError::InvalidRequest("the runtime rejected the input".into()),
                };
                Err(RuntimeError::Rejected { error: Box::new(error), upstream_code, upstream_message })
            }
            other => other,
        }
    }

    fn stop(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        self.end(worker_id, "stop", reason)
    }

    fn cancel(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        self.end(worker_id, "cancel", reason)
    }

    fn interrupt(&self, worker_id: &str) -> RuntimeResult<LifecycleAck> {
        // A runtime without the extension route answers 404 `not_found` (or 405); ours says
        // `invalid_request` (its base code) for a worker that is not running.
        self.end(worker_id, "interrupt", None).map_err(|e| match e {
            RuntimeError::HttpStatus { status: 404, .. } => RuntimeError::Unsupported,
            RuntimeError::Rejected { upstream_code, upstream_message, .. } if upstream_code == "invalid_request" => {
                let error = Box::new(RuntimeError::WorkerNotRunning(WorkerStatus::Stopped));
                RuntimeError::Rejected { error, upstream_code, upstream_message }
            }
            other => other,
        })
    }

    fn delete(&self, worker_id: &str) -> RuntimeResult<()> {
        let path = worker_path(worker_id);
        let _: serde_json::Value = self.guarded(|client, o| {
            client.call("DELETE", &path, None, "deleted", o.write_timeout, Operation::Lifecycle)
        })?;
        Ok(())
    }

    fn transcript(&self, worker_id: &str, start: u64, limit: u64) -> RuntimeResult<Transcript> {
        crate::runtime::handle::check_transcript_limit(limit)?;
        let path = format!("{}/transcript?start={start}&limit={limit}", worker_path(worker_id));
        let mut transcript: Transcript = self.read(&path, "transcript")?;
        // A page stops at the same size as the embedded runtime's: the rest is the next one.
        let fit = entries_within_page_bytes(transcript.items.iter().map(|i| i.content.len()));
        if fit < transcript.items.len() {
            transcript.items.truncate(fit);
            transcript.next_start = Some(start + fit as u64);
        }
        let items = transcript.items.iter_mut().map(|i| &mut i.worker_ref);
        self.own_answer(worker_id, std::iter::once(&mut transcript.worker_ref).chain(items), false);
        transcript.items.iter_mut().for_each(text::clean_entry);
        Ok(transcript)
    }

    fn health(&self) -> Health {
        self.shared.health.get()
    }

    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Remote
    }

    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    fn error_counts(&self) -> Vec<(&'static str, u64)> {
        self.shared.errors.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(c, n)| (*c, *n)).collect()
    }

    fn open_events(&self, worker_id: &str, after: Option<u64>) -> RuntimeResult<Box<dyn EventSource>> {
        let mut path = format!("{}/events/ws", worker_path(worker_id));
        if let Some(seq) = after {
            path.push_str(&format!(
                "?cursor={}",
                crate::runtime::frames::cursor(crate::runtime::frames::RUNTIME_CURSOR, seq)
            ));
        }
        let o = &self.shared.options;
        let private = self.shared.private.clone();
        let result = events::connect(o, worker_id, &path, private);
        match &result {
            Ok(_) => self.shared.health.request_ok(),
            Err(e) => self.shared.health.failed(e),
        }
        Ok(Box::new(result?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(base_url: &str, token: &str) -> RemoteOptions {
        RemoteOptions {
            runtime_id: "lab".into(),
            base_url: base_url.into(),
            token: Some(Secret::new(token)),
            tls: None,
            connect_timeout: Duration::from_millis(50),
            read_timeout: Duration::from_millis(50),
            write_timeout: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(50),
            probe_interval: Duration::from_secs(60),
            event_silence: Duration::from_secs(60),
            max_in_flight: 1,
            max_idle_connections: 4,
        }
    }

    /// A runtime too busy to answer an event stream's upgrade within the connect budget is
    /// slow, not incompatible (which it was taken for, under a connection storm).
    #[test]
    fn an_upgrade_left_unanswered_is_a_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let silent = std::thread::spawn(move || listener.accept().map(|(socket, _)| socket));
        let runtime = RemoteRuntime::start(options(&base_url, "t"));
        let opened = runtime.open_events("worker-00000001", None);
        assert!(matches!(opened, Err(RuntimeError::Timeout(50))), "{:?}", opened.err());
        assert_ne!(runtime.health().state, crate::runtime::handle::HealthState::Incompatible);
        drop(silent.join());
    }

    #[test]
    fn debug_hides_the_url_and_token() {
        let options = options("http://secret-host.example:4711", "tok-very-secret");
        let text = format!("{:?}", RemoteRuntime::start(options));
        assert!(text.contains("<backend-private>") && text.contains("<redacted>"), "{text}");
        for secret in ["secret-host", "4711", "tok-very-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn worker_ids_stay_one_segment() {
        assert_eq!(worker_path("worker-00000001"), "/v1/workers/worker-00000001");
        assert_eq!(worker_path("a/b"), "/v1/workers/a%2Fb");
    }
}
