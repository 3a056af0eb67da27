//! tiny_http acceptor → bounded queue → fixed pool of handler threads; graceful shutdown.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TrySendError, bounded};
use serde::Serialize;

use super::body::Incoming;
use super::error::ApiError;
use crate::config::ServerConfig;

/// What a handler answers: status, body and a few headers.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response body.
    pub body: Vec<u8>,
    /// `Content-Type` value.
    pub content_type: &'static str,
    /// Extra headers; values are built by this program, never copied from a request.
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status, body, content_type: "application/json", headers: Vec::new() },
            Err(e) => Reply::error(&ApiError::internal(format!("could not serialize the response: {e}")), ""),
        }
    }

    /// A reply with an arbitrary content type.
    pub fn bytes(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply { status, body: body.into(), content_type, headers: Vec::new() }
    }

    /// The JSON error envelope for `error`, with its `Retry-After`/`Allow`/`WWW-Authenticate`.
    pub fn error(error: &ApiError, request_id: &str) -> Reply {
        let mut reply = Reply::json(error.status, &error.to_json(request_id));
        if let Some(secs) = error.extra.retry_after {
            reply.headers.push(("Retry-After", secs.to_string()));
        }
        if let Some(allow) = error.extra.allow {
            reply.headers.push(("Allow", allow.to_owned()));
        }
        if error.status == 401 && error.code == "unauthorized" {
            reply.headers.push(("WWW-Authenticate", "Bearer".to_owned()));
        }
        reply
    }
}

/// A request handler: plain blocking code, called on a pool thread.
pub trait Service: Send + Sync + 'static {
    /// Answers one request. Taking the request out of `request` (a WebSocket upgrade) means
    /// the handler answered it itself; the returned reply is then only logged.
    fn handle(&self, request: &mut Incoming) -> Result<Reply, ApiError>;
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

fn next_request_id() -> String {
    format!("r-{:016x}", NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
}

/// A running HTTP server.
pub struct HttpServer {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    pool_done: Receiver<()>,
    stop_watchdog: Option<crossbeam_channel::Sender<()>>,
}

impl HttpServer {
    /// Binds `config.bind` and starts the acceptor and `config.threads` handler threads.
    pub fn start(config: &ServerConfig, service: Arc<dyn Service>) -> anyhow::Result<HttpServer> {
        let server = tiny_http::Server::http(config.bind)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.bind))?;
        let addr = server.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("listener has no IP address"))?;
        let server = Arc::new(server);
        let (queue_tx, queue_rx) = bounded::<tiny_http::Request>(config.queue);
        let (done_tx, pool_done) = bounded::<()>(0);
        for index in 0..config.threads {
            let (rx, done, service) = (queue_rx.clone(), done_tx.clone(), service.clone());
            let (max_body, port) = (config.max_body_bytes, addr.port());
            std::thread::Builder::new().name(format!("http-{index}")).spawn(move || {
                for request in rx.iter() {
                    serve_one(service.as_ref(), request, max_body, port);
                }
                drop(done);
            })?;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (server, stopping) = (server.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("http-acceptor".into())
                .spawn(move || accept_loop(&server, &stopping, queue_tx))?
        };
        let (stop_watchdog, watchdog_stopped) = bounded(1);
        super::watchdog::start(addr, watchdog_stopped)?;
        Ok(HttpServer {
            addr,
            server,
            stopping,
            acceptor: Some(acceptor),
            pool_done,
            stop_watchdog: Some(stop_watchdog),
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets queued and in-flight requests finish within `grace`.
    /// Returns false when the grace ran out first.
    pub fn shutdown(mut self, grace: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stop_watchdog.take());
        self.server.unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let deadline = Instant::now() + grace;
        loop {
            match self.pool_done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
                Ok(()) => {}
            }
        }
    }
}

fn accept_loop(
    server: &tiny_http::Server,
    stopping: &AtomicBool,
    queue: crossbeam_channel::Sender<tiny_http::Request>,
) {
    loop {
        match server.recv() {
            Ok(request) => match queue.try_send(request) {
                Ok(()) => {}
                Err(TrySendError::Full(request)) => {
                    let id = next_request_id();
                    let error = ApiError::overloaded("the request queue is full; retry shortly");
                    log::warn!("{id} {} {} 503 queue full", request.method(), path_only(request.url()));
                    respond(request, Reply::error(&error, &id), &id);
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    log::error!("acceptor stopped: {e}");
                }
                return;
            }
        }
    }
}

fn serve_one(service: &dyn Service, request: tiny_http::Request, max_body: u64, port: u16) {
    if request.url() == super::watchdog::PROBE_PATH {
        let _ = request.respond(tiny_http::Response::empty(204));
        return;
    }
    let started = Instant::now();
    let id = next_request_id();
    let method = request.method().as_str().to_owned();
    let path = path_only(request.url()).to_owned();
    let mut incoming = Incoming::new(request, id.clone(), max_body, port);
    let reply = match catch_unwind(AssertUnwindSafe(|| service.handle(&mut incoming))) {
        Ok(Ok(reply)) => reply,
        Ok(Err(error)) => Reply::error(&error, &id),
        Err(_) => {
            log::error!("{id} handler panicked on {method} {path}");
            Reply::error(&ApiError::internal("internal error while handling the request"), &id)
        }
    };
    let status = reply.status;
    // No request left means it was upgraded: the handler owns the connection now.
    if let Some(request) = incoming.into_request() {
        respond(request, reply, &id);
    }
    log::info!(
        target: "access",
        "{id} {method} {} {status} {:.1}ms",
        super::error::printable(&path),
        started.elapsed().as_secs_f64() * 1000.0
    );
}

fn respond(request: tiny_http::Request, reply: Reply, request_id: &str) {
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    let headers = [("Content-Type", reply.content_type.to_owned()), ("X-Request-Id", request_id.to_owned())];
    for (name, value) in headers.into_iter().chain(reply.headers) {
        match safe_header(name, &value) {
            Some(header) => response.add_header(header),
            None => log::error!("{request_id} dropped unsafe header {name}"),
        }
    }
    if let Err(e) = request.respond(response) {
        log::debug!("{request_id} could not write the response: {e}");
    }
}

/// Builds a header, refusing values with control characters (tiny_http would send CR/LF).
fn safe_header(name: &str, value: &str) -> Option<tiny_http::Header> {
    if value.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn path_only(url: &str) -> &str {
    url.split_once('?').map_or(url, |(path, _)| path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_values_with_line_breaks_are_refused() {
        assert!(super::safe_header("X-Test", "a\r\nSet-Cookie: x=1").is_none());
        assert!(super::safe_header("X-Test", "fine").is_some());
    }
}
