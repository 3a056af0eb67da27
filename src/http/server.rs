//! tiny_http acceptor → bounded queue → fixed pool of handler threads; graceful shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

    /// A low-cardinality name for the route of `method` `path`, for metrics.
    fn route_class(&self, _method: &str, _path: &str) -> &'static str {
        "other"
    }
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

fn next_request_id() -> String {
    format!("r-{:016x}", NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
}

/// Requests served, by route class and status, and the queue depth.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    queue: Mutex<Option<Receiver<tiny_http::Request>>>,
    rebinds: AtomicU64,
}

impl HttpMetrics {
    fn count(&self, class: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((class, status)).or_default() += 1;
    }

    /// Appends the Prometheus text of these metrics to `out`.
    pub fn render(&self, out: &mut String) {
        out.push_str("# TYPE worker_gateway_http_requests_total counter\n");
        for ((class, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!("worker_gateway_http_requests_total{{route=\"{class}\",status=\"{status}\"}} {n}\n"));
        }
        let depth = self.queue.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, Receiver::len);
        out.push_str(&format!(
            "# TYPE worker_gateway_http_queue_depth gauge\nworker_gateway_http_queue_depth {depth}\n"
        ));
        let rebinds = self.rebinds.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE worker_gateway_http_rebinds_total counter\nworker_gateway_http_rebinds_total {rebinds}\n"
        ));
    }
}

/// The listening tiny_http server; replaced when its accept thread dies (tiny_http's
/// acceptor ends for good on an accept error such as EMFILE).
pub struct Listener {
    addr: SocketAddr,
    current: Mutex<Arc<tiny_http::Server>>,
    metrics: Arc<HttpMetrics>,
}

impl Listener {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn current(&self) -> Arc<tiny_http::Server> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Listens anew on the same address and moves the acceptor onto the new server.
    pub fn rebind(&self) -> anyhow::Result<()> {
        let fresh = listen(self.addr).map_err(|e| anyhow::anyhow!("cannot listen again: {e}"))?;
        let old = std::mem::replace(&mut *self.current.lock().unwrap_or_else(|p| p.into_inner()), Arc::new(fresh));
        old.unblock();
        self.metrics.rebinds.fetch_add(1, Ordering::Relaxed);
        log::warn!("the HTTP acceptor had died; listening again on {}", self.addr);
        Ok(())
    }
}

/// A running HTTP server.
pub struct HttpServer {
    addr: SocketAddr,
    listener: Arc<Listener>,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    pool_done: Receiver<()>,
    stop_watchdog: Option<crossbeam_channel::Sender<()>>,
}

impl HttpServer {
    /// Binds `config.bind` and starts the acceptor, `config.threads` handler threads and the
    /// watchdog; request counts go to `metrics`.
    pub fn start(
        config: &ServerConfig,
        service: Arc<dyn Service>,
        metrics: Arc<HttpMetrics>,
    ) -> anyhow::Result<HttpServer> {
        let server = listen(config.bind).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.bind))?;
        let addr = server.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("listener has no IP address"))?;
        let listener = Arc::new(Listener { addr, current: Mutex::new(Arc::new(server)), metrics: metrics.clone() });
        let (queue_tx, queue_rx) = bounded::<tiny_http::Request>(config.queue);
        *metrics.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue_rx.clone());
        let (done_tx, pool_done) = bounded::<()>(0);
        for index in 0..config.threads {
            let (rx, done, service, metrics) = (queue_rx.clone(), done_tx.clone(), service.clone(), metrics.clone());
            let (max_body, port) = (config.max_body_bytes, addr.port());
            std::thread::Builder::new().name(format!("http-{index}")).spawn(move || {
                for request in rx.iter() {
                    // A pool thread must outlive any bug: handler panics are answered with a
                    // 500 inside, and anything else is caught here.
                    let served = catch_unwind(AssertUnwindSafe(|| {
                        serve_one(service.as_ref(), &metrics, request, max_body, port)
                    }));
                    if served.is_err() {
                        log::error!("a request handler thread caught a panic outside the handler");
                    }
                }
                drop(done);
            })?;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (listener, stopping) = (listener.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("http-acceptor".into())
                .spawn(move || accept_loop(&listener, &stopping, &queue_tx))?
        };
        let (stop_watchdog, watchdog_stopped) = bounded(1);
        super::watchdog::start(listener.clone(), watchdog_stopped)?;
        Ok(HttpServer {
            addr,
            listener,
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
    /// Returns false (and says so in the log) when the grace ran out first.
    pub fn shutdown(mut self, grace: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stop_watchdog.take());
        self.listener.current().unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let deadline = Instant::now() + grace;
        loop {
            match self.pool_done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!("some requests were still running after {} ms", grace.as_millis());
                    return false;
                }
                Ok(()) => {}
            }
        }
    }
}

/// A tiny_http server on a listener from [`super::sockets::listen`].
fn listen(addr: SocketAddr) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    tiny_http::Server::from_listener(super::sockets::listen(addr)?, None)
}

fn accept_loop(listener: &Listener, stopping: &AtomicBool, queue: &crossbeam_channel::Sender<tiny_http::Request>) {
    let port = listener.addr.port();
    loop {
        let server = listener.current();
        match server.recv() {
            // The watchdog's probe is answered here: it must never take a queue slot or a
            // pool thread from real requests.
            Ok(request) if request.url() == super::watchdog::PROBE_PATH => {
                let _ = request.respond(tiny_http::Response::empty(204));
            }
            Ok(request) => match queue.try_send(request) {
                Ok(()) => {}
                Err(TrySendError::Full(request)) => {
                    let id = next_request_id();
                    let error = ApiError::overloaded("the request queue is full; retry shortly");
                    log::warn!("{id} {} {} 503 queue full", request.method(), path_only(request.url()));
                    respond(request, Reply::error(&error, &id), &id, port, true);
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if Arc::ptr_eq(&server, &listener.current()) {
                    log::error!("acceptor: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                // else: the listener was rebound; go on with the new server
            }
        }
    }
}

fn serve_one(service: &dyn Service, metrics: &HttpMetrics, request: tiny_http::Request, max_body: u64, port: u16) {
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
    metrics.count(service.route_class(&method, &path), status);
    let unread = incoming.body_unread();
    // No request left means it was upgraded: the handler owns the connection now.
    if let Some(request) = incoming.into_request() {
        respond(request, reply, &id, port, unread);
    }
    log::info!(
        target: "access",
        "{id} {method} {} {status} {:.1}ms",
        super::error::printable(&path),
        started.elapsed().as_secs_f64() * 1000.0
    );
}

/// Bodies at most this long are drained (off the pool, with a read timeout) when unread;
/// longer ones are never dropped (tiny_http would allocate their whole length at once).
const DRAIN_LIMIT: usize = 64 << 20;

/// tiny_http reads bodies up to 1 KiB eagerly; longer ones are drained when dropped.
const EAGER_BODY: usize = 1024;

/// Builds the response and writes it. A request whose declared body was not read is
/// answered without letting tiny_http's drain block a pool thread or abort the process.
fn respond(request: tiny_http::Request, reply: Reply, request_id: &str, port: u16, body_unread: bool) {
    let large = reply.body.len() > LARGE_RESPONSE;
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    let headers = [("Content-Type", reply.content_type.to_owned()), ("X-Request-Id", request_id.to_owned())];
    for (name, value) in headers.into_iter().chain(reply.headers) {
        match safe_header(name, &value) {
            Some(header) => response.add_header(header),
            None => log::error!("{request_id} dropped unsafe header {name}"),
        }
    }
    match request.body_length().filter(|n| body_unread && *n > EAGER_BODY) {
        None if large => write_off_pool(request, response, request_id),
        None => {
            if let Err(e) = request.respond(response) {
                log::debug!("{request_id} could not write the response: {e}");
            }
        }
        Some(declared) => respond_unread(request, response, declared, port),
    }
}

/// Responses larger than this are written by a writer thread, so a client that never
/// reads cannot hold a pool thread (the socket's write timeout bounds the writer).
const LARGE_RESPONSE: usize = 64 << 10;

/// Writer threads at once; past this, large responses are written on the pool thread.
const MAX_WRITERS: usize = 64;

static WRITERS: AtomicUsize = AtomicUsize::new(0);

fn write_off_pool(
    request: tiny_http::Request,
    response: tiny_http::Response<std::io::Cursor<Vec<u8>>>,
    request_id: &str,
) {
    let id = request_id.to_owned();
    let write = move || {
        if let Err(e) = request.respond(response) {
            log::debug!("{id} could not write the response: {e}");
        }
    };
    if WRITERS.fetch_add(1, Ordering::SeqCst) >= MAX_WRITERS {
        WRITERS.fetch_sub(1, Ordering::SeqCst);
        return write();
    }
    let spawned = std::thread::Builder::new().name("http-writer".into()).spawn(move || {
        write();
        WRITERS.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        WRITERS.fetch_sub(1, Ordering::SeqCst);
        log::error!("cannot start a writer thread: {e}");
    }
}

/// Streams kept forever: dropping them would make tiny_http allocate their declared length.
static PARKED: Mutex<Vec<Box<dyn tiny_http::ReadWrite + Send>>> = Mutex::new(Vec::new());

fn respond_unread(
    request: tiny_http::Request,
    response: tiny_http::Response<std::io::Cursor<Vec<u8>>>,
    declared: usize,
    port: u16,
) {
    let socket = request.remote_addr().and_then(|peer| super::sockets::find_socket(*peer, port));
    if declared <= DRAIN_LIMIT {
        if let Some(socket) = &socket {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
        }
        let spawned =
            std::thread::Builder::new().name("http-drain".into()).spawn(move || drop(request.respond(response)));
        if let Err(e) = spawned {
            log::error!("cannot start a drain thread: {e}");
        }
        return;
    }
    // Take the connection over: answer, end it, and keep the stream so nothing drains it.
    // (tiny_http sends only the head of an upgrade response; the body follows, ended by
    // the close.)
    let body = response.into_reader().into_inner();
    let mut stream = request.upgrade("close", tiny_http::Response::empty(413).with_header(content_type_json()));
    let _ = std::io::Write::write_all(&mut stream, &body).and_then(|()| std::io::Write::flush(&mut stream));
    if let Some(socket) = &socket {
        super::sockets::shut(socket);
    }
    log::warn!("refused a request declaring a {declared}-byte body; its connection was closed");
    PARKED.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
}

fn content_type_json() -> tiny_http::Header {
    tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid static header")
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
