//! The Runtime API (`/v1/...`, runtime-api.md) over a runtime handle, with bearer-token auth;
//! `worker-gateway runtime` serves it over an engine.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use super::engine::{Engine, Opening};
use super::events_ws;
use super::handle::{MAX_TRANSCRIPT_LIMIT, RuntimeError, RuntimeHandle};
use super::types::{CreateWorker, TranscriptItem, WorkerInput};
use crate::config::RuntimeServerConfig;
use crate::config::{DEFAULT_MAX_WS_SESSIONS, ServerConfig};
use crate::http::browsers::{self, HostPolicy};
use crate::http::router::{Query, Target, check_id};
use crate::http::sockets;
use crate::http::websocket::{self, SessionLimit};
use crate::http::{ApiError, HttpServer, Incoming, Reply, Service};
use crate::secret::Secret;

/// `stop` / `cancel` body: empty, `{}` or `{"reason":…}` (unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
struct EndBody {
    reason: Option<String>,
}

/// The Runtime API service.
pub struct RuntimeApi {
    engine: Arc<Engine>,
    token: Option<Secret>,
    sessions: Arc<SessionLimit>,
    hosts: HostPolicy,
    origins: Vec<String>,
}

impl RuntimeApi {
    /// Serves `engine` with `server`'s limits; with `token`, every request (the WebSocket
    /// upgrade included) must carry `Authorization: Bearer <token>`.
    pub fn new(engine: Arc<Engine>, token: Option<Secret>, server: &ServerConfig) -> RuntimeApi {
        let max_sessions = sockets::fit_descriptors(
            "max_ws_sessions",
            server.max_ws_sessions,
            DEFAULT_MAX_WS_SESSIONS,
            sockets::descriptor_budget(),
        );
        RuntimeApi {
            engine,
            token,
            sessions: SessionLimit::new(max_sessions),
            hosts: HostPolicy::new(server.bind, server.allowed_hosts.clone()),
            origins: server.allowed_origins.clone(),
        }
    }

    /// The Runtime API is for programs, not web pages: a request a browser sends for a page
    /// (of any site but an allowed origin) is refused, so a page cannot drive a runtime that
    /// has no token (a simple POST to `stop` needs no preflight) or read its event stream. A
    /// runtime without a token also answers only its own names (a page whose name was rebound
    /// to this address could otherwise read it).
    fn check_browser(&self, request: &Incoming) -> Result<(), ApiError> {
        if self.token.is_none() {
            self.hosts.check(request)?;
        }
        if browsers::from_a_page(request) && !browsers::allowed_origin(request, &self.origins) {
            return Err(ApiError::new(
                403,
                "forbidden_origin",
                "the Runtime API does not answer web pages (this request has an Origin or Sec-Fetch-Site): \
                 browsers reach runtimes through the gateway",
            ));
        }
        Ok(())
    }

    /// `GET /v1/workers/{id}/events/ws`: HTTP errors before the upgrade, then a session.
    fn events(&self, request: &mut Incoming, worker_id: &str, query: &str) -> Result<Reply, ApiError> {
        self.engine.worker(worker_id).map_err(|e| runtime_error(&e))?;
        if !websocket::is_upgrade(request) {
            return Err(ApiError::bad_request("invalid_request", "this route is a WebSocket: send an upgrade"));
        }
        let vocabulary = vocabulary(request); // read before the upgrade takes the request
        let cursor = Query::parse(query).get("cursor")?.map(str::to_owned);
        let permit = self.sessions.acquire()?;
        let session = websocket::upgrade(request, permit)?;
        let (engine, worker_id) = (self.engine.clone(), worker_id.to_owned());
        websocket::start(session, events_ws::session_options(), move |waker| {
            events_ws::feed(&engine, &worker_id, cursor.as_deref(), vocabulary, waker)
        })?;
        Ok(Reply::bytes(101, "text/plain", ""))
    }

    fn route(&self, request: &mut Incoming, target: &Target) -> Result<Reply, ApiError> {
        let method = request.method().to_owned();
        let parts = target.parts();
        let (allow, worker) = match parts.as_slice() {
            ["v1", "runtime"] => ("GET, HEAD", None),
            ["v1", "workers"] => ("GET, HEAD, POST", None),
            ["v1", "workers", id] => ("GET, HEAD, DELETE", Some(*id)),
            ["v1", "workers", id, "input" | "stop" | "cancel" | "interrupt"] => ("POST", Some(*id)),
            ["v1", "workers", id, "transcript"] => ("GET, HEAD", Some(*id)),
            ["v1", "workers", id, "events", "ws"] => ("GET", Some(*id)),
            _ => return Err(ApiError::route_not_found(request.url())),
        };
        if let Some(id) = worker {
            check_id("worker id", id, "invalid_worker_id")?;
        }
        if !allow.split(", ").any(|m| m == method) {
            return Err(ApiError::method_not_allowed(&method, allow));
        }
        if let (["v1", "workers", _, "events", "ws"], Some(id)) = (parts.as_slice(), worker) {
            return self.events(request, id, &target.query);
        }
        let handle: &dyn RuntimeHandle = self.engine.as_ref();
        let fail = |e: RuntimeError| runtime_error(&e);
        let reply = match (parts.as_slice(), worker) {
            (["v1", "runtime"], _) => json!({"runtime": handle.summary().map_err(fail)?}),
            (["v1", "workers"], _) if method == "POST" => {
                let idempotency_key = request.idempotency_key()?;
                let create = CreateWorker { idempotency_key, ..request.read_json()? };
                json!({"worker": handle.create_worker(create).map_err(fail)?})
            }
            (["v1", "workers"], _) => json!({"workers": handle.list_workers().map_err(fail)?}),
            ([.., "input"], Some(id)) => {
                let idempotency_key = request.idempotency_key()?;
                let input = WorkerInput { idempotency_key, ..request.read_json()? };
                json!({"ack": handle.input(id, input).map_err(fail)?})
            }
            ([.., "stop"], Some(id)) => {
                let body: EndBody = request.read_optional_json_of_any_type()?;
                json!({"ack": handle.stop(id, body.reason).map_err(fail)?})
            }
            ([.., "cancel"], Some(id)) => {
                let body: EndBody = request.read_optional_json_of_any_type()?;
                json!({"ack": handle.cancel(id, body.reason).map_err(fail)?})
            }
            ([.., "interrupt"], Some(id)) => json!({"ack": handle.interrupt(id).map_err(fail)?}),
            (["v1", "workers", _], Some(id)) if method == "DELETE" => {
                // The worker's ref is read first: a deleted worker can no longer tell it.
                let worker_ref = handle.worker(id).map_err(fail)?.worker_ref;
                handle.delete(id).map_err(fail)?;
                json!({"deleted": {"worker_ref": worker_ref}})
            }
            ([.., "transcript"], Some(id)) => {
                let query = Query::parse(&target.query);
                let start = query.number("start")?.unwrap_or(0);
                let limit = query.number("limit")?.unwrap_or(MAX_TRANSCRIPT_LIMIT);
                let mut transcript = handle.transcript(id, start, limit).map_err(fail)?;
                if vocabulary(request) == Vocabulary::Base {
                    transcript.items = transcript.items.iter().map(TranscriptItem::for_base).collect();
                }
                json!({"transcript": transcript})
            }
            (_, Some(id)) => json!({"worker": handle.worker(id).map_err(fail)?}),
            (_, None) => return Err(ApiError::route_not_found(request.url())),
        };
        Ok(Reply::json(200, &reply))
    }
}

impl Service for RuntimeApi {
    fn is_probe(&self, method: &str, path: &str) -> bool {
        method == "GET" && path == "/v1/runtime"
    }

    fn handle(&self, request: &mut Incoming) -> Result<Reply, ApiError> {
        self.check_browser(request)?;
        if let Some(token) = &self.token {
            if !token.matches_bearer(request.header("authorization")) {
                return Err(ApiError::new(401, "unauthorized", "missing or wrong bearer token"));
            }
        }
        let target = Target::parse(request.url());
        self.route(request, &target).map_err(|e| match e.code {
            // The Runtime API calls every body problem `invalid_json`.
            "unsupported_media_type" => ApiError::bad_request("invalid_json", e.message),
            _ => e,
        })
    }
}

/// Which values a client understands: a strict base client rejects a response holding any
/// value it does not know, so extension values go only to clients that ask for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocabulary {
    /// The base values only (no `X-Worker-Runtime-Extensions: 1`).
    Base,
    /// Every extension value too.
    Extended,
}

/// The vocabulary `request` asked for.
fn vocabulary(request: &Incoming) -> Vocabulary {
    match request.header("x-worker-runtime-extensions").map(str::trim) {
        Some("1") => Vocabulary::Extended,
        _ => Vocabulary::Base,
    }
}

/// Maps an engine error onto the Runtime API's codes.
fn runtime_error(error: &RuntimeError) -> ApiError {
    let (status, code) = match error {
        RuntimeError::WorkerNotFound => (404, "worker_not_found"),
        RuntimeError::WorkerNotRunning(_) | RuntimeError::InvalidRequest(_) => (400, "invalid_request"),
        RuntimeError::WorkerBusy => (409, "worker_busy"),
        RuntimeError::WorkerRunning => (409, "worker_running"),
        RuntimeError::LimitTooLarge(_) => (400, "limit_too_large"),
        RuntimeError::RuntimeStopped => (409, "runtime_stopped"),
        RuntimeError::Store(_) => (500, "store_io"),
        RuntimeError::PayloadTooLarge => (413, "payload_too_large"),
        RuntimeError::KeyReused => (422, "idempotency_key_reused"), // only to a client sending keys
        // As the HTTP layer answers a full queue: nothing was done, retry in a moment.
        RuntimeError::Overloaded => (503, "overloaded"),
        _ => (500, "internal"),
    };
    let mut api = ApiError::new(status, code, error.to_string());
    if status == 503 {
        api.extra.retry_after = Some(1);
    }
    api
}

/// A running runtime process: the engine and its Runtime API server.
pub struct RuntimeServer {
    http: HttpServer,
    engine: Arc<Engine>,
    config: RuntimeServerConfig,
}

impl RuntimeServer {
    /// Opens the engine and serves it. Without a token, only a loopback bind is allowed
    /// unless `insecure_no_token`.
    pub fn start(config: RuntimeServerConfig, insecure_no_token: bool) -> anyhow::Result<RuntimeServer> {
        let bind = config.server.bind;
        if config.token.is_none() {
            anyhow::ensure!(
                bind.ip().is_loopback() || insecure_no_token,
                "refusing to serve {bind} without a token: set --token-env/--token-file (or pass --insecure-no-token)"
            );
            log::warn!("no token configured: any local process can drive this runtime (fine on loopback only)");
        }
        let mut opening = Opening::default();
        let engine = opening.open(config.engine.clone()).context("cannot open the runtime's store")?;
        let api = RuntimeApi::new(engine.clone(), config.token.clone(), &config.server);
        let http = HttpServer::start(&config.server, Arc::new(api), Arc::default())?;
        opening.keep();
        Ok(RuntimeServer { http, engine, config })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Stops serving, ends turns and flushes the store.
    pub fn shutdown(mut self) {
        let grace = self.config.server.shutdown_grace;
        self.http.shutdown(grace);
        self.engine.shutdown(grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime out of descriptors for a journal answers as its HTTP layer does with a full
    /// queue: 503 `overloaded`, retry in a second (it said 500 `internal`).
    #[test]
    fn an_overloaded_engine_is_a_503_to_retry() {
        let e = runtime_error(&RuntimeError::Overloaded);
        assert_eq!((e.status, e.code, e.extra.retry_after), (503, "overloaded", Some(1)));
        let e = runtime_error(&RuntimeError::Store("disk full".into()));
        assert_eq!((e.status, e.code, e.extra.retry_after), (500, "store_io", None));
    }
}
