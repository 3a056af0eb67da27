//! The browser-facing API (`/api/...`, `/healthz`, `/readyz`) as an HTTP [`Service`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::cursor;
use super::errors::{api_error, runtime_not_found};
use super::registry::{Registry, RuntimeEntry};
use super::relay::{Hub, Snapshot};
use super::views::{AckView, CreateBody, EndBody, InputBody, TranscriptView, WorkerView};
use crate::http::browsers::{self, HostPolicy};
use crate::http::router::{Query, Target, check_id};
use crate::http::websocket::{self, Closing, SessionLimit, SessionOptions};
use crate::http::{ApiError, HttpMetrics, Incoming, Reply, Service};
use crate::runtime::frames::diagnostic_frame;
use crate::runtime::handle::{MAX_TRANSCRIPT_LIMIT, MAX_TRANSCRIPT_PAGE_BYTES, RuntimeError, RuntimeHandle};
use crate::runtime::types::{Activity, CreateExtras, CreateWorker, Intent, ProfileRef, WorkerDetail, WorkerInput};
use crate::secret::Secret;

/// A worker-level action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Input,
    Stop,
    Cancel,
    Interrupt,
    Transcript,
}

/// A parsed route; ids borrow from the request target.
#[derive(Debug)]
enum Route<'a> {
    Healthz,
    Readyz,
    Runtimes,
    Runtime(&'a str),
    RuntimeWorkers(&'a str),
    AllWorkers,
    Worker(&'a str, &'a str),
    WorkerAction(&'a str, &'a str, Action),
    Events(&'a str, &'a str),
    Metrics,
    Dashboard,
}

impl<'a> Route<'a> {
    fn parse(parts: &[&'a str]) -> Option<Route<'a>> {
        Some(match *parts {
            [] => Route::Dashboard,
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["api", "runtimes"] => Route::Runtimes,
            ["api", "workers"] => Route::AllWorkers,
            ["api", "runtimes", rid] => Route::Runtime(rid),
            ["api", "runtimes", rid, "workers"] => Route::RuntimeWorkers(rid),
            ["api", "runtimes", rid, "workers", wid] => Route::Worker(rid, wid),
            ["api", "runtimes", rid, "workers", wid, "events", "ws"] => Route::Events(rid, wid),
            ["api", "runtimes", rid, "workers", wid, action] => {
                let action = match action {
                    "input" => Action::Input,
                    "stop" => Action::Stop,
                    "cancel" => Action::Cancel,
                    "interrupt" => Action::Interrupt,
                    "transcript" => Action::Transcript,
                    _ => return None,
                };
                Route::WorkerAction(rid, wid, action)
            }
            _ => return None,
        })
    }

    fn check_ids(&self) -> Result<(), ApiError> {
        let (rid, wid) = match self {
            Route::Runtime(rid) | Route::RuntimeWorkers(rid) => (Some(*rid), None),
            Route::Worker(rid, wid) | Route::WorkerAction(rid, wid, _) | Route::Events(rid, wid) => {
                (Some(*rid), Some(*wid))
            }
            _ => (None, None),
        };
        if let Some(rid) = rid {
            check_id("runtime id", rid, "invalid_id")?;
        }
        if let Some(wid) = wid {
            check_id("worker id", wid, "invalid_id")?;
        }
        Ok(())
    }

    /// The methods this route accepts (for `Allow`).
    fn allow(&self) -> &'static str {
        match self {
            Route::RuntimeWorkers(_) => "GET, HEAD, POST",
            Route::Worker(..) => "GET, HEAD, DELETE",
            Route::WorkerAction(_, _, Action::Transcript) => "GET, HEAD",
            Route::WorkerAction(..) => "POST",
            // A WebSocket opens with a GET only.
            Route::Events(..) => "GET",
            _ => "GET, HEAD",
        }
    }
}

/// The gateway API service.
pub struct GatewayApi {
    registry: Registry,
    token: Option<Secret>,
    hosts: HostPolicy,
    origins: Vec<String>,
    hub: Arc<Hub>,
    sessions: Arc<SessionLimit>,
    http_metrics: Arc<HttpMetrics>,
}

/// Where the browser-facing event streams come from, how many may run, and the HTTP
/// server's metrics (for `/metrics`).
pub struct Streams {
    /// The relays.
    pub hub: Arc<Hub>,
    /// The session cap.
    pub sessions: Arc<SessionLimit>,
    /// Origins allowed on upgrades besides the gateway's own.
    pub allowed_origins: Vec<String>,
    /// Request counts of the HTTP server.
    pub http_metrics: Arc<HttpMetrics>,
}

impl GatewayApi {
    /// A service over `registry`; with `token`, `/api/*` requires it.
    pub fn new(registry: Registry, token: Option<Secret>, hosts: HostPolicy, streams: Streams) -> GatewayApi {
        let Streams { hub, sessions, allowed_origins, http_metrics } = streams;
        GatewayApi { registry, token, hosts, origins: allowed_origins, hub, sessions, http_metrics }
    }

    /// For requests that may change something or open an event stream (every method but
    /// GET, HEAD and OPTIONS; WebSocket upgrades): `Origin` must be this gateway (same host)
    /// or an allowed origin, and a browser's `Sec-Fetch-Site: cross-site` is refused unless
    /// its `Origin` is an allowed one. Without either header (not a browser: curl, scripts)
    /// the request is accepted.
    fn check_origin(&self, request: &Incoming) -> Result<(), ApiError> {
        let origin = request.header("origin");
        let allowed = browsers::allowed_origin(request, &self.origins);
        // The same host, reached the way this gateway is: a page of `http://gw` is another
        // site than the dashboard of `https://gw`.
        let same_host = origin.and_then(|o| o.split_once("://")).is_some_and(|(scheme, host)| {
            self.hosts.own_scheme(request, scheme)
                && request.header("host").is_some_and(|h| h.eq_ignore_ascii_case(host))
        });
        let cross_site = request.header("sec-fetch-site").is_some_and(|s| s.trim().eq_ignore_ascii_case("cross-site"));
        // A second Origin (or Sec-Fetch-Site) would pass unchecked.
        let repeated = request.header_repeated("origin") || request.header_repeated("sec-fetch-site");
        if (origin.is_none() || same_host || allowed) && (!cross_site || allowed) && !repeated {
            Ok(())
        } else {
            Err(ApiError::new(
                403,
                "forbidden_origin",
                "cross-site request refused: the Origin must be this gateway or one of its allowed_origins",
            ))
        }
    }

    /// `GET …/events/ws`: checks, a fresh snapshot and the upgrade on this pool thread; the
    /// session then joins the stream (opening the upstream or reading a replay may block) on
    /// a thread of its own, and runs on a poller ([`websocket::start`]).
    fn events(&self, request: &mut Incoming, rid: &str, wid: &str, query: &str) -> Result<Reply, ApiError> {
        let entry = self.runtime(rid)?;
        self.check_origin(request)?;
        let after = match Query::parse(query).get("cursor")? {
            None | Some("") => None,
            Some(c) => Some(cursor::parse(c).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "cursor must be a bo_ cursor as the event frames carry it (of this gateway, or another with the same configuration)")
            })?),
        };
        let fail = |e: RuntimeError| api_error(&e, rid, Some(wid));
        let detail = entry.handle.worker(wid).map_err(fail)?;
        if !websocket::is_upgrade(request) {
            return Err(ApiError::bad_request("invalid_request", "this route is a WebSocket: send an upgrade"));
        }
        let permit = self.sessions.acquire()?;
        if !self.hub.has_room_for((rid, wid)) {
            return Err(ApiError::overloaded(self.hub.full()));
        }
        let snapshot = {
            let (handle, rid) = (entry.handle.clone(), rid.to_owned());
            Snapshot::new(detail.last_event_id, move || snapshot_payload(handle.as_ref(), &rid, &detail))
        };
        let snapshot = if after.is_some() { snapshot } else { snapshot.read_now().map_err(fail)? };
        let session = websocket::upgrade(request, permit)?;
        let (hub, handle, key) = (self.hub.clone(), entry.handle.clone(), (rid.to_owned(), wid.to_owned()));
        websocket::start(session, session_options(), move |waker| {
            match hub.subscribe((&key.0, &key.1), handle, after, &snapshot, waker.clone()) {
                Ok(subscription) => Box::new(subscription.feed()),
                Err(e) => {
                    let (code, why) = match e {
                        RuntimeError::WorkerNotFound => ("backend.worker_not_found", e.to_string()),
                        // Every relay was taken between the check above and now.
                        RuntimeError::Overloaded => ("backend.unavailable", hub.full()),
                        _ => ("backend.unavailable", e.to_string()),
                    };
                    let frame = diagnostic_frame(code, &format!("cannot open the event stream: {why}"));
                    Box::new(Closing(Some(frame)))
                }
            }
        })?;
        Ok(Reply::bytes(101, "text/plain", ""))
    }

    fn runtime(&self, runtime_id: &str) -> Result<&RuntimeEntry, ApiError> {
        self.registry.get(runtime_id).ok_or_else(|| runtime_not_found(runtime_id))
    }

    /// The bearer token; WebSocket upgrades may carry it as `?token=` instead, since
    /// browsers cannot set headers there.
    fn check_token(&self, request: &Incoming, query: &str) -> Result<(), ApiError> {
        let Some(token) = &self.token else { return Ok(()) };
        let by_header = token.matches_bearer(request.header("authorization"));
        let by_query = || {
            websocket::is_upgrade(request)
                && Query::parse(query).get("token").ok().flatten().is_some_and(|t| token.matches(t))
        };
        if by_header || by_query() {
            Ok(())
        } else {
            Err(ApiError::new(401, "unauthorized", "missing or wrong bearer token"))
        }
    }

    /// Prometheus text: requests, queue, upstream errors and in-flight per runtime,
    /// WebSocket sessions, relays and what they relayed. Labels are configured ids only.
    fn metrics(&self) -> Reply {
        let mut out = String::new();
        self.http_metrics.render(&mut out);
        out.push_str("# TYPE worker_gateway_upstream_errors_total counter\n");
        for entry in self.registry.entries() {
            for (code, n) in entry.handle.error_counts() {
                out.push_str(&format!(
                    "worker_gateway_upstream_errors_total{{runtime=\"{}\",code=\"{code}\"}} {n}\n",
                    entry.id
                ));
            }
        }
        // Each family's samples together, after its TYPE line (the text format asks for it).
        type Gauge = fn(&RuntimeEntry) -> usize;
        let per_runtime: [(&str, Gauge); 2] = [
            ("runtime_in_flight", |entry| entry.handle.in_flight()),
            ("runtime_ready", |entry| usize::from(entry.handle.health().is_ready())),
        ];
        for (name, value) in per_runtime {
            out.push_str(&format!("# TYPE worker_gateway_{name} gauge\n"));
            for entry in self.registry.entries() {
                out.push_str(&format!("worker_gateway_{name}{{runtime=\"{}\"}} {}\n", entry.id, value(entry)));
            }
        }
        let c = self.hub.counters();
        let gauges = [("ws_sessions", self.sessions.active() as u64), ("relay_upstreams", self.hub.upstreams() as u64)];
        for (name, value) in gauges {
            out.push_str(&format!("# TYPE worker_gateway_{name} gauge\nworker_gateway_{name} {value}\n"));
        }
        let counters = [
            ("relay_events_total", &c.events),
            ("relay_reconnects_total", &c.reconnects),
            ("relay_gaps_total", &c.gaps),
            ("relay_slow_consumers_total", &c.slow_consumers),
        ];
        for (name, value) in counters {
            let value = value.load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!("# TYPE worker_gateway_{name} counter\nworker_gateway_{name} {value}\n"));
        }
        Reply::bytes(200, "text/plain; version=0.0.4", out)
    }

    fn readyz(&self) -> Reply {
        let runtimes: Vec<_> = self.registry.entries().iter().map(|e| (e.id.as_str(), e.handle.health())).collect();
        let ready = runtimes.iter().all(|(_, h)| h.is_ready());
        let list: Vec<_> = runtimes.iter().map(|(id, h)| json!({"runtime_id": id, "state": h.state})).collect();
        let status = if ready { "ready" } else { "not_ready" };
        Reply::json(if ready { 200 } else { 503 }, &json!({"status": status, "runtimes": list}))
    }

    fn worker_action(
        &self,
        request: &mut Incoming,
        rid: &str,
        wid: &str,
        action: Action,
        query: &str,
    ) -> Result<Reply, ApiError> {
        let entry = self.runtime(rid)?;
        let fail = |e: RuntimeError| api_error(&e, rid, Some(wid));
        match action {
            Action::Input => {
                let idempotency_key = request.idempotency_key()?;
                let body: InputBody = request.read_json()?;
                let input = WorkerInput { kind: body.kind, content: body.content, idempotency_key };
                let ack = entry.handle.input(wid, input).map_err(fail)?;
                Ok(Reply::json(200, &json!({"ack": AckView::input(rid, wid, ack)})))
            }
            Action::Stop | Action::Cancel | Action::Interrupt => {
                let body: EndBody = request.read_optional_json()?;
                let ack = match action {
                    Action::Stop => entry.handle.stop(wid, body.reason),
                    Action::Cancel => entry.handle.cancel(wid, body.reason),
                    _ => entry.handle.interrupt(wid),
                }
                .map_err(fail)?;
                Ok(Reply::json(200, &json!({"ack": AckView::lifecycle(rid, wid, ack)})))
            }
            Action::Transcript => {
                let query = Query::parse(query);
                let start = query.number("start")?.unwrap_or(0);
                let limit = query.number("limit")?.unwrap_or(MAX_TRANSCRIPT_LIMIT);
                let transcript = entry.handle.transcript(wid, start, limit).map_err(fail)?;
                Ok(Reply::json(200, &TranscriptView::new(rid, wid, transcript)))
            }
        }
    }

    /// `DELETE …/workers/{wid}`: a stopped or cancelled worker goes for good.
    fn delete_worker(&self, rid: &str, wid: &str) -> Result<Reply, ApiError> {
        self.runtime(rid)?.handle.delete(wid).map_err(|e| api_error(&e, rid, Some(wid)))?;
        Ok(Reply::json(200, &json!({"deleted": {"runtime_id": rid, "worker_id": wid}})))
    }

    fn create_worker(&self, request: &mut Incoming, rid: &str) -> Result<Reply, ApiError> {
        let entry = self.runtime(rid)?;
        let idempotency_key = request.idempotency_key()?;
        let body: CreateBody = request.read_optional_json()?;
        let create = CreateWorker {
            intent: body.intent.unwrap_or(Intent::Assistant { purpose: None }),
            profile: body.profile.map_or(ProfileRef::RuntimeDefault, ProfileRef::Named),
            extras: CreateExtras::default(),
            idempotency_key,
        };
        let worker = entry.handle.create_worker(create).map_err(|e| api_error(&e, rid, None))?;
        Ok(Reply::json(201, &json!({"worker": WorkerView::from_detail(rid, worker)})))
    }
}

impl Route<'_> {
    /// A low-cardinality name for metrics (`method` tells a delete from a read).
    fn class(&self, method: &str) -> &'static str {
        match self {
            Route::Worker(..) if method == "DELETE" => "delete",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Dashboard => "dashboard",
            Route::Runtimes => "runtimes",
            Route::Runtime(_) => "runtime",
            Route::RuntimeWorkers(_) => "runtime_workers",
            Route::AllWorkers => "all_workers",
            Route::Worker(..) => "worker",
            Route::WorkerAction(_, _, Action::Input) => "input",
            Route::WorkerAction(_, _, Action::Stop) => "stop",
            Route::WorkerAction(_, _, Action::Cancel) => "cancel",
            Route::WorkerAction(_, _, Action::Interrupt) => "interrupt",
            Route::WorkerAction(_, _, Action::Transcript) => "transcript",
            Route::Events(..) => "events",
        }
    }
}

impl Service for GatewayApi {
    fn route_class(&self, method: &str, path: &str) -> &'static str {
        Route::parse(&Target::parse(path).parts()).map_or("unknown", |r| r.class(method))
    }

    fn is_probe(&self, method: &str, path: &str) -> bool {
        method == "GET" && matches!(self.route_class(method, path), "healthz" | "readyz" | "metrics")
    }

    fn handle(&self, request: &mut Incoming) -> Result<Reply, ApiError> {
        self.hosts.check(request)?;
        // Every method but the safe ones may change something (only POST and DELETE are
        // routed; any other is refused the same way before its 405).
        if !matches!(request.method(), "GET" | "HEAD" | "OPTIONS") {
            self.check_origin(request)?;
        }
        let target = Target::parse(request.url());
        let parts = target.parts();
        if parts.first() == Some(&"api") {
            self.check_token(request, &target.query)?;
        }
        let route = Route::parse(&parts).ok_or_else(|| ApiError::route_not_found(request.url()))?;
        route.check_ids()?;
        let method = request.method().to_owned();
        let allowed = route.allow().split(", ").any(|m| m == method);
        if !allowed {
            return Err(ApiError::method_not_allowed(&method, route.allow()));
        }
        match route {
            Route::Healthz => Ok(Reply::json(200, &json!({"status": "ok"}))),
            Route::Readyz => Ok(self.readyz()),
            Route::Metrics => Ok(self.metrics()),
            Route::Dashboard => Ok(dashboard()),
            Route::Runtimes => {
                let items: Vec<_> = self.registry.entries().iter().map(Registry::view).collect();
                Ok(Reply::json(200, &json!({"items": items})))
            }
            Route::Runtime(rid) => Ok(Reply::json(200, &Registry::view(self.runtime(rid)?))),
            Route::AllWorkers => Ok(Reply::json(200, &self.registry.all_workers())),
            Route::RuntimeWorkers(rid) if method == "POST" => self.create_worker(request, rid),
            Route::RuntimeWorkers(rid) => {
                let workers = self.runtime(rid)?.handle.list_workers().map_err(|e| api_error(&e, rid, None))?;
                let items: Vec<_> = workers.into_iter().map(|w| WorkerView::from_summary(rid, w)).collect();
                // Serialized as it is, not through a `Value` tree (several times its size).
                #[derive(serde::Serialize)]
                struct Listing<'a> {
                    runtime_id: &'a str,
                    items: Vec<WorkerView>,
                }
                Ok(Reply::json(200, &Listing { runtime_id: rid, items }))
            }
            Route::Worker(rid, wid) if method == "DELETE" => self.delete_worker(rid, wid),
            Route::Worker(rid, wid) => {
                let worker = self.runtime(rid)?.handle.worker(wid).map_err(|e| api_error(&e, rid, Some(wid)))?;
                Ok(Reply::json(200, &WorkerView::from_detail(rid, worker)))
            }
            Route::WorkerAction(rid, wid, action) => self.worker_action(request, rid, wid, action, &target.query),
            Route::Events(rid, wid) => self.events(request, rid, wid, &target.query),
        }
    }
}

/// The dashboard page (embedded in the binary; no build step, nothing from a CDN).
const DASHBOARD: &str = include_str!("dashboard/index.html");

fn dashboard() -> Reply {
    let mut reply = Reply::bytes(200, "text/html; charset=utf-8", DASHBOARD);
    reply.headers.push(("X-Frame-Options", "DENY".to_owned()));
    reply.headers.push((
        "Content-Security-Policy",
        "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
            .to_owned(),
    ));
    reply
}

/// Browser event-stream policy: pings every 20 s, a browser silent for 60 s is dropped.
fn session_options() -> SessionOptions {
    SessionOptions {
        ping_every: Duration::from_secs(20),
        idle_limit: Duration::from_secs(60),
        observation_only: diagnostic_frame(
            "backend.observation_only",
            "this stream is observation-only; send nothing but control frames",
        ),
    }
}

/// How long reading a snapshot's transcript pages may take in all.
const SNAPSHOT_BUDGET: Duration = Duration::from_secs(10);

/// The worker's state now, for a subscriber without a cursor: `last_event_id` is read
/// first, so transcript entries recorded after it are left to the live stream. The entries
/// are the newest ones, at most a page and a page's bytes.
/// The `snapshot` event payload of `detail`'s worker: its transcript up to `last_event_id`
/// (the newest entries, at most a page's bytes), its status and greeting.
fn snapshot_payload(
    handle: &dyn RuntimeHandle,
    rid: &str,
    detail: &WorkerDetail,
) -> Result<serde_json::Value, RuntimeError> {
    let position = detail.last_event_id;
    let mut start = detail.transcript_len.saturating_sub(MAX_TRANSCRIPT_LIMIT);
    let mut entries = std::collections::VecDeque::new();
    let mut bytes = 0;
    // The newest page's worth, read in at most that many pages and within the budget of one
    // upgrade: a remote whose pages never end (each a step further, forever) cannot hold a
    // thread and a share of its bulkhead.
    let deadline = Instant::now() + SNAPSHOT_BUDGET;
    for _ in 0..MAX_TRANSCRIPT_LIMIT {
        if Instant::now() > deadline {
            return Err(RuntimeError::Timeout(SNAPSHOT_BUDGET.as_millis() as u64));
        }
        let page = handle.transcript(&detail.worker_id, start, MAX_TRANSCRIPT_LIMIT)?;
        for item in page.items.into_iter().filter(|i| i.event_id <= position) {
            bytes += item.content.len();
            entries.push_back(item);
        }
        while bytes > MAX_TRANSCRIPT_PAGE_BYTES && entries.len() > 1 {
            bytes -= entries.pop_front().map_or(0, |i| i.content.len());
        }
        match page.next_start {
            Some(next) if next > start && next < detail.transcript_len => start = next,
            _ => break,
        }
    }
    let entries: Vec<_> = entries
        .iter()
        .map(|i| json!({"sequence": i.sequence, "role": i.author(), "content": i.content, "event_id": i.event_id, "at": i.at}))
        .collect();
    let status = if detail.activity == Some(Activity::Busy) { "running" } else { "idle" };
    let greeting = json!({"runtime_id": rid, "worker_id": detail.worker_id, "worker_status": detail.status});
    Ok(json!({"event": "snapshot", "data": {"entries": entries, "greeting": greeting, "status": status}}))
}
