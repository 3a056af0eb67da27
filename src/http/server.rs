//! tiny_http acceptor → bounded queue → a pool of handler threads that follows the load;
//! graceful shutdown.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;

use super::body::{Incoming, framing_problem};
use super::error::{ApiError, printable};
use super::guard::{Taken, Unanswered, Watched};
use super::pipelining::{Held, Holding, MAX_HELD, Refusals, refuse_overflow};
use crate::config::ServerConfig;
use crate::pool::{Limits, Pool};

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

    /// True for a request that only asks whether the server is up, or for its metrics: a
    /// probe comes every few seconds, so when it succeeds its access line logs at debug and
    /// does not bury the requests that did something.
    fn is_probe(&self, _method: &str, _path: &str) -> bool {
        false
    }
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// A new request id (`r-` and 16 hex digits), unique within this process: for a response
/// and its log line.
pub(crate) fn next_request_id() -> String {
    format!("r-{:016x}", NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
}

/// Requests served, by route class and status, the queue depth and the pool's threads.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pool: Mutex<Option<Pool<Job>>>,
    rebinds: AtomicU64,
    cut: AtomicU64,
    stuck: AtomicU64,
}

impl HttpMetrics {
    /// Whether requests wait for a handler thread: every one is busy.
    pub(super) fn requests_waiting(&self) -> bool {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|pool| pool.queued() > 0)
    }

    /// One more connection cut by [`super::guard`].
    pub(super) fn connection_cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
    }

    /// One more connection the HTTP layer stopped serving, its thread stuck for good (see
    /// [`super::guard::STUCK_AFTER`]).
    pub(super) fn connection_stuck(&self) {
        self.stuck.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, class: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((class, status)).or_default() += 1;
    }

    /// Appends the Prometheus text of these metrics to `out`.
    pub fn render(&self, out: &mut String) {
        out.push_str("# TYPE worker_gateway_http_requests_total counter\n");
        for ((class, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!("worker_gateway_http_requests_total{{route=\"{class}\",status=\"{status}\"}} {n}\n"));
        }
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (depth, threads, busy) = pool.map_or((0, 0, 0), |pool| (pool.queued(), pool.threads(), pool.busy()));
        out.push_str(&format!(
            "# TYPE worker_gateway_http_queue_depth gauge\nworker_gateway_http_queue_depth {depth}\n"
        ));
        out.push_str(&format!(
            "# TYPE worker_gateway_http_requests_in_flight gauge\nworker_gateway_http_requests_in_flight {busy}\n"
        ));
        out.push_str(&format!("# TYPE worker_gateway_http_threads gauge\nworker_gateway_http_threads {threads}\n"));
        let rebinds = self.rebinds.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE worker_gateway_http_rebinds_total counter\nworker_gateway_http_rebinds_total {rebinds}\n"
        ));
        let cut = self.cut.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE worker_gateway_http_connections_cut_total counter\nworker_gateway_http_connections_cut_total {cut}\n"
        ));
        let stuck = self.stuck.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE worker_gateway_http_stuck_threads_total counter\nworker_gateway_http_stuck_threads_total {stuck}\n"
        ));
    }
}

/// The listening tiny_http server; replaced when its accept thread dies (tiny_http's
/// acceptor ends for good on an accept error such as EMFILE).
pub struct Listener {
    addr: SocketAddr,
    current: Mutex<Listening>,
    metrics: Arc<HttpMetrics>,
}

/// A tiny_http server and its listening socket (which the server owns, and keeps open as
/// long as it lives).
struct Listening {
    server: Arc<tiny_http::Server>,
    socket: RawFd,
}

impl Listener {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Listening> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Arc<tiny_http::Server> {
        self.lock().server.clone()
    }

    /// Listens anew on the same address and moves the acceptor onto the new server.
    pub fn rebind(&self) -> anyhow::Result<()> {
        let (fresh, _) = listen(self.addr).map_err(|e| anyhow::anyhow!("cannot listen again: {e}"))?;
        let old = std::mem::replace(&mut *self.lock(), fresh);
        let _ = old.server.unblock();
        self.metrics.rebinds.fetch_add(1, Ordering::Relaxed);
        log::warn!("the HTTP acceptor had died; listening again on {}", self.addr);
        Ok(())
    }

    /// Stops listening (shutdown): new connections are refused at once, so a client or a
    /// load balancer goes elsewhere instead of waiting on a server that will not answer.
    /// Connections already open stay open. The socket stays bound until the server goes.
    fn stop_listening(&self) {
        let listening = self.lock();
        // SAFETY: shuts down reading on the listening socket, which the server (alive while
        // the guard holds it) owns; tiny_http's accept then fails and its accept thread ends.
        unsafe { libc::shutdown(listening.socket, libc::SHUT_RD) };
    }
}

/// A running HTTP server.
pub struct HttpServer {
    addr: SocketAddr,
    listener: Arc<Listener>,
    /// Set when shutdown begins: what still arrives is answered 503 `shutting_down`.
    stopping: Arc<AtomicBool>,
    /// Set when the server is dropped (the process is done): the acceptor ends.
    drained: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    pool: Pool<Job>,
    stop_watchdog: Option<crossbeam_channel::Sender<()>>,
    tls: Option<crate::tls::front::Front>,
}

/// How long a handler thread beyond the kept ones waits for a request before it ends.
const IDLE_THREAD: Duration = Duration::from_secs(5);

/// Handler threads that stay when idle (once started), so a burst does not begin by starting
/// threads.
pub const KEPT_THREADS: usize = 4;

impl HttpServer {
    /// Binds `config.bind` and starts the acceptor and the watchdog. Handler threads start
    /// as requests wait for one, up to `config.threads`, and end when idle (a few stay);
    /// request counts go to `metrics`. With a TLS certificate and key, the server listens on
    /// loopback and a TLS front on `config.bind` (see [`crate::tls::front`]).
    pub fn start(
        config: &ServerConfig,
        service: Arc<dyn Service>,
        metrics: Arc<HttpMetrics>,
    ) -> anyhow::Result<HttpServer> {
        use crate::tls::front::{Front, ServerTls};
        let tls = ServerTls::load(config.tls_cert_file.as_deref(), config.tls_key_file.as_deref())?;
        // Behind TLS the server listens on loopback only; the front is the public listener.
        let bind = if tls.is_some() { SocketAddr::from(([127, 0, 0, 1], 0)) } else { config.bind };
        let (listening, addr) = listen(bind).map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))?;
        let tls = tls
            .map(|tls| Front::start(config.bind, addr, tls))
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.bind))?;
        let listener = Arc::new(Listener { addr, current: Mutex::new(listening), metrics: metrics.clone() });
        let writes = Arc::new(WriteBudget::new(config.max_pending_response_bytes));
        let (max_body, port, handled) = (config.max_body_bytes, addr.port(), metrics.clone());
        let limits = Limits { max_threads: config.threads, keep: KEPT_THREADS, queue: config.queue, idle: IDLE_THREAD };
        let pool = Pool::new("http", limits, move |job: Job| {
            serve_one(service.as_ref(), &handled, job, max_body, port, &writes)
        });
        *metrics.pool.lock().unwrap_or_else(|p| p.into_inner()) = Some(pool.clone());
        let (stopping, drained) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let unanswered = Arc::new(Unanswered::default());
        let acceptor = {
            let phase = Phase { stopping: stopping.clone(), drained: drained.clone() };
            let (listener, pool, unanswered) = (listener.clone(), pool.clone(), unanswered.clone());
            std::thread::Builder::new()
                .name("http-acceptor".into())
                .spawn(move || accept_loop(&listener, &phase, &pool, &unanswered))?
        };
        let (stop_watchdog, watchdog_stopped) = bounded(1);
        super::watchdog::start(listener.clone(), watchdog_stopped.clone())?;
        let watched =
            Watched { port: addr.port(), max_body: config.max_body_bytes, unanswered, metrics: metrics.clone() };
        super::guard::start(watched, watchdog_stopped)?;
        Ok(HttpServer {
            addr: tls.as_ref().map_or(addr, Front::addr),
            tls,
            listener,
            stopping,
            drained,
            acceptor: Some(acceptor),
            pool,
            stop_watchdog: Some(stop_watchdog),
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and lets queued and in-flight requests finish within `grace`.
    /// New connections are refused from now on; requests that still come on connections
    /// already open are answered 503 `shutting_down` until the server is dropped (while the
    /// rest of the process shuts down, they get an answer rather than a wait). Returns false
    /// (and says so in the log) when the grace ran out first.
    pub fn shutdown(&mut self, grace: Duration) -> bool {
        if let Some(front) = self.tls.take() {
            front.stop();
        }
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stop_watchdog.take());
        self.listener.stop_listening();
        self.pool.close();
        // Said, so a shutdown that takes a while is not a mystery (a second signal ends it).
        let in_flight = self.pool.busy() + self.pool.queued();
        if in_flight > 0 {
            log::info!("waiting up to {} s for {in_flight} request(s) under way", grace.as_secs());
        }
        let ended = self.pool.wait_ended(grace);
        if !ended {
            log::warn!("some requests were still running after {} ms", grace.as_millis());
        }
        ended
    }
}

impl Drop for HttpServer {
    /// Ends the acceptor (after [`HttpServer::shutdown`], or at once).
    fn drop(&mut self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            self.listener.stop_listening();
        }
        self.drained.store(true, Ordering::SeqCst);
        let _ = self.listener.current().unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A tiny_http server on a listener from [`super::sockets::listen`], and its address.
fn listen(addr: SocketAddr) -> Result<(Listening, SocketAddr), Box<dyn std::error::Error + Send + Sync>> {
    let listener = super::sockets::listen(addr)?;
    let (bound, socket) = (listener.local_addr()?, listener.as_raw_fd());
    let config = tiny_http::ServerConfig::new_http(bound)?;
    let server = Arc::new(tiny_http::Server::from_listener(listener, tiny_http::ListenAddr::IP(bound), config)?);
    Ok((Listening { server, socket }, bound))
}

/// A request the acceptor took, for the pool: answered when it is dropped (see
/// [`Unanswered`]).
pub(super) struct Job {
    pub(super) request: tiny_http::Request,
    pub(super) taken: Taken,
}

impl Job {
    /// `request`, taken: its body is still to be read when it is larger than what tiny_http
    /// reads eagerly (or chunked).
    pub(super) fn new(request: tiny_http::Request, unanswered: &Arc<Unanswered>) -> Job {
        let chunked = request.headers().get("transfer-encoding").is_some();
        let body_unread = request.body_length().map_or(chunked, |n| n > EAGER_BODY);
        let changing = super::pipelining::changes_something(&request);
        let taken = unanswered.taken(request.remote_addr().copied(), body_unread, changing);
        Job { request, taken }
    }
}

/// Where a server is in its life: see [`HttpServer::stopping`] and [`HttpServer::drained`].
struct Phase {
    stopping: Arc<AtomicBool>,
    drained: Arc<AtomicBool>,
}

fn accept_loop(listener: &Listener, phase: &Phase, pool: &Pool<Job>, unanswered: &Arc<Unanswered>) {
    let stopping = &*phase.stopping;
    let port = listener.addr.port();
    let metrics = &*listener.metrics;
    let mut taker =
        Taker { port, refused: Refusals::default(), held: Held::default(), pool, unanswered, stopping, metrics };
    // Servers replaced by a rebind, and since when each has been quiet: their connections
    // still send requests, which are served until they go quiet (else those connections,
    // their threads and descriptors, would wait for ever on a queue nobody reads).
    let mut retired: Vec<(Arc<tiny_http::Server>, Instant)> = Vec::new();
    while !phase.drained.load(Ordering::SeqCst) {
        let server = listener.current();
        let received = match (retired.is_empty() && !stopping.load(Ordering::SeqCst), taker.held.any()) {
            (true, false) => server.recv().map(|read| read.map(Some)),
            (_, true) => server.recv_timeout(HELD_POLL),
            (false, false) => server.recv_timeout(RETIRED_POLL),
        };
        match received {
            Ok(Ok(Some(request))) => taker.take(request),
            Ok(Ok(None)) => {} // a wait for the retired servers' sake ended, or unblocked
            Ok(Err(error)) => read_failed(&error.to_string()),
            // Once stopping, the accept thread's end (the listener was shut) is expected.
            Err(_) if stopping.load(Ordering::SeqCst) => {}
            Err(e) => {
                if Arc::ptr_eq(&server, &listener.current()) {
                    log::error!("acceptor: {e}");
                    listen_again(listener, &server, stopping);
                }
            }
        }
        taker.release_held();
        if !Arc::ptr_eq(&server, &listener.current()) {
            retired.push((server, Instant::now()));
        }
        retired.retain_mut(|(old, quiet_since)| {
            loop {
                match old.try_recv() {
                    Ok(Some(request)) => taker.take(request),
                    Ok(None) => break,
                    Err(e) => read_failed(&e.to_string()),
                }
                *quiet_since = Instant::now();
            }
            quiet_since.elapsed() < RETIRED_QUIET
        });
    }
}

/// How often the acceptor looks at retired servers while it has some.
const RETIRED_POLL: Duration = Duration::from_millis(50);

/// How often the acceptor looks for requests it held back that may go now.
const HELD_POLL: Duration = Duration::from_millis(1);

/// A retired server quiet this long is let go: past the guard's closing of idle
/// connections (8 to 20 s) and tiny_http's 30 s read timeout.
const RETIRED_QUIET: Duration = Duration::from_secs(60);

/// Takes each request from the HTTP layer into the pool, or refuses it.
struct Taker<'a> {
    port: u16,
    /// Connections one of whose requests was refused: what they send next is refused too.
    refused: Refusals,
    /// Requests of connections that have their share of the pool.
    held: Held,
    pool: &'a Pool<Job>,
    unanswered: &'a Arc<Unanswered>,
    /// Shutdown began: requests are refused.
    stopping: &'a AtomicBool,
    /// Where cut connections are counted.
    metrics: &'a HttpMetrics,
}

impl Taker<'_> {
    fn take(&mut self, request: tiny_http::Request) {
        let (port, unanswered) = (self.port, self.unanswered);
        // The watchdog's probe is answered here: it must never take a queue slot or a pool
        // thread from real requests.
        if request.url() == super::watchdog::PROBE_PATH {
            let _ = request.respond(tiny_http::Response::empty(204));
            return;
        }
        // Checked here, in arrival order, before any request behind it on the same
        // connection (tiny_http may already have read one) can reach a handler.
        if self.refused.holds(request.remote_addr()) {
            return self.refuse_behind_a_refusal(request);
        }
        if let Some(problem) = framing_problem(&request) {
            let id = next_request_id();
            log::warn!("{id} refused: {problem}; connection closed");
            let reply = Reply::error(&ApiError::bad_request("invalid_request", problem), &id);
            self.refused.refuse(Job::new(request, unanswered), reply, id, port, false);
            return;
        }
        match self.held.hold(request, unanswered) {
            Holding::Free(request) => self.dispatch(request),
            Holding::Held => {}
            Holding::Overflow(held) => {
                let peer = held.front().and_then(|r| r.remote_addr().copied());
                log::warn!(
                    "cut the connection from {}: more than {MAX_HELD} requests sent without reading their answers",
                    peer.map_or_else(|| "?".to_owned(), |p| p.to_string())
                );
                self.metrics.connection_cut();
                refuse_overflow(&mut self.refused, held, unanswered, port);
            }
        }
    }

    /// Refuses `request`: an earlier request of its connection was refused.
    fn refuse_behind_a_refusal(&mut self, request: tiny_http::Request) {
        let id = next_request_id();
        log::debug!("{id} refused: an earlier request on this connection was refused");
        let problem = "an earlier request on this connection was refused";
        let reply = Reply::error(&ApiError::bad_request("invalid_request", problem), &id);
        self.refused.refuse(Job::new(request, self.unanswered), reply, id, self.port, false);
    }

    /// Hands the held requests that may go now to the pool.
    fn release_held(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        held.release(self.unanswered, |request| self.dispatch(request));
        self.held = held;
    }

    /// Hands `request` to the pool, or refuses it: an earlier request of its connection was
    /// refused (while it was held), shutting down, or the queue is full.
    fn dispatch(&mut self, request: tiny_http::Request) {
        let (port, unanswered) = (self.port, self.unanswered);
        if self.refused.holds(request.remote_addr()) {
            return self.refuse_behind_a_refusal(request);
        }
        if self.stopping.load(Ordering::SeqCst) {
            let id = next_request_id();
            let (method, path) = (printable(request.method().as_str()), printable(path_only(request.url())));
            log::info!("{id} {method} {path} 503 shutting down");
            let reply = Reply::error(&ApiError::shutting_down(), &id);
            self.refused.refuse(Job::new(request, unanswered), reply, id, port, false);
            return;
        }
        if let Err(job) = self.pool.submit(Job::new(request, unanswered)) {
            let id = next_request_id();
            let error = ApiError::overloaded("the request queue is full; retry shortly");
            let request = &job.request;
            let (method, path) = (printable(request.method().as_str()), printable(path_only(request.url())));
            log::warn!("{id} {method} {path} 503 queue full");
            answer_off_the_acceptor(job, Reply::error(&error, &id), id, port);
        }
    }
}

/// Answers `job` with `reply` in its turn, keeping its connection, on a thread of its own:
/// the answer waits behind those of earlier requests on the connection, which must not hold
/// the acceptor. A connection has at most [`super::pipelining::PIPELINE_DEPTH`] requests in
/// flight, these included, so it never has more such threads. Its connection is not marked
/// refused: a 503 for a full queue says nothing against what it sends next (and a new
/// connection from the same address and port must not be taken for it).
fn answer_off_the_acceptor(job: Job, reply: Reply, id: String, port: u16) {
    let spawned = std::thread::Builder::new().name("http-busy".into()).spawn(move || {
        let Job { request, taken } = job;
        respond(request, reply, &id, port, false, None);
        drop(taken);
    });
    if let Err(e) = spawned {
        log::error!("cannot start a thread to answer a request the queue had no room for: {e}");
    }
}

/// Logs what the HTTP layer could not read as a request: a connection that ended between
/// requests, or one it answered 400 itself (a malformed head, ambiguous framing) and closed.
fn read_failed(error: &str) {
    if connection_ended(error) {
        log::trace!("a connection ended: {error}");
    } else {
        log::debug!("refused a malformed request: {}", printable(error));
    }
}

/// tiny_http's accept thread ends at any accept error but an aborted connection (out of
/// descriptors, most often), and its listening socket with it: listens anew as soon as
/// descriptors are no longer short (the guard closes idle connections meanwhile; a new
/// acceptor would die at once), at most a second later, rather than refuse connections until
/// the watchdog's probes notice.
fn listen_again(listener: &Listener, dead: &Arc<tiny_http::Server>, stopping: &AtomicBool) {
    let patience = Instant::now() + Duration::from_secs(1);
    while !stopping.load(Ordering::SeqCst) && Arc::ptr_eq(dead, &listener.current()) {
        if !super::sockets::descriptors_short() || Instant::now() >= patience {
            match listener.rebind() {
                Ok(()) => return,
                Err(e) => log::debug!("{e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether tiny_http's read error (its type is private; this is its `Display`) is a
/// connection that ended or broke, as every keep-alive connection does when its client is
/// done, rather than a request it refused: an end of input, or an error from the socket.
fn connection_ended(error: &str) -> bool {
    error.strip_prefix("[ReadIoError] ").is_some_and(|io| io == "Unexpected EOF" || io.contains("(os error "))
}

fn serve_one(
    service: &dyn Service,
    metrics: &Arc<HttpMetrics>,
    job: Job,
    max_body: u64,
    port: u16,
    writes: &Arc<WriteBudget>,
) {
    let started = Instant::now();
    let id = next_request_id();
    let method = job.request.method().as_str().to_owned();
    let path = path_only(job.request.url()).to_owned();
    let mut incoming = Incoming::new(job.request, job.taken, id.clone(), max_body, port, metrics.clone());
    let handled = catch_unwind(AssertUnwindSafe(|| service.handle(&mut incoming))).unwrap_or_else(|_| {
        log::error!("{id} handler panicked on {} {}", printable(&method), printable(&path));
        Err(ApiError::internal("internal error while handling the request"))
    });
    let mut reply = handled.unwrap_or_else(|error| Reply::error(&error, &id));
    let permit = if reply.body.len() > LARGE_RESPONSE { writes.reserve(reply.body.len()) } else { None };
    if reply.body.len() > LARGE_RESPONSE && permit.is_none() {
        let error = ApiError::overloaded("too many large responses are being sent to slow clients; retry shortly");
        reply = Reply::error(&error, &id);
    }
    let status = reply.status;
    // HEAD is served as GET (see `Incoming::method`): counted, and a probe, as one.
    let served_as = if method == "HEAD" { "GET" } else { method.as_str() };
    metrics.count(service.route_class(served_as, &path), status);
    let close = incoming.ends_connection();
    // No request left means it was upgraded: the handler owns the connection now.
    let (request, taken) = incoming.into_parts();
    if let Some(request) = request {
        respond(request, reply, &id, port, close, permit);
    }
    drop(taken);
    let level = match status < 400 && service.is_probe(served_as, &path) {
        true => log::Level::Debug,
        false => log::Level::Info,
    };
    log::log!(
        target: "access",
        level,
        "{id} {} {} {status} {:.1}ms",
        printable(&method),
        printable(&path),
        started.elapsed().as_secs_f64() * 1000.0
    );
}

/// Bodies up to this length tiny_http has read already (so they never hold a connection).
pub(super) const EAGER_BODY: usize = 1024;

/// Builds the response and writes it. With `close`, the connection is ended after the
/// response without reading the request's body: a client that declares a huge body and
/// never sends it holds nothing, and nothing smuggled behind refused framing is read.
pub(super) fn respond(
    request: tiny_http::Request,
    reply: Reply,
    request_id: &str,
    port: u16,
    close: bool,
    large: Option<WritePermit>,
) {
    let named = [("Content-Type", reply.content_type.to_owned()), ("X-Request-Id", request_id.to_owned())];
    let headers: Vec<tiny_http::Header> = named
        .into_iter()
        .chain(reply.headers)
        .filter_map(|(name, value)| {
            let header = safe_header(name, &value);
            if header.is_none() {
                log::error!("{request_id} dropped unsafe header {name}");
            }
            header
        })
        .collect();
    if close {
        return respond_and_close(request, reply.status, headers, &reply.body, port);
    }
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    for header in headers {
        response.add_header(header);
    }
    if let Some(permit) = large {
        write_off_pool(request, response, request_id, permit);
    } else if let Err(e) = request.respond(response) {
        log::debug!("{request_id} could not write the response: {e}");
    }
}

/// Responses larger than this are written by a writer thread, so a client that never
/// reads cannot hold a pool thread (the socket's write timeout bounds the writer).
const LARGE_RESPONSE: usize = 64 << 10;

/// Writer threads at once, whatever their sizes.
const MAX_WRITERS: usize = 64;

/// What large responses still being written to their clients hold: bytes and threads, each
/// capped, so clients that never read cannot take the memory or the threads.
pub struct WriteBudget {
    bytes: AtomicUsize,
    writers: AtomicUsize,
    max_bytes: usize,
}

/// A reservation of [`WriteBudget`], released when the response has been written.
pub struct WritePermit {
    budget: Arc<WriteBudget>,
    bytes: usize,
}

impl WriteBudget {
    fn new(max_bytes: usize) -> WriteBudget {
        WriteBudget { bytes: AtomicUsize::new(0), writers: AtomicUsize::new(0), max_bytes }
    }

    /// Reserves `bytes` and a writer, or `None` when either cap would be passed.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<WritePermit> {
        if self.writers.fetch_add(1, Ordering::SeqCst) >= MAX_WRITERS {
            self.writers.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        if self.bytes.fetch_add(bytes, Ordering::SeqCst) + bytes > self.max_bytes {
            self.bytes.fetch_sub(bytes, Ordering::SeqCst);
            self.writers.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(WritePermit { budget: self.clone(), bytes })
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        self.budget.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_off_pool(
    request: tiny_http::Request,
    response: tiny_http::Response<std::io::Cursor<Vec<u8>>>,
    request_id: &str,
    permit: WritePermit,
) {
    let id = request_id.to_owned();
    let spawned = std::thread::Builder::new().name("http-writer".into()).spawn(move || {
        if let Err(e) = request.respond(response) {
            log::debug!("{id} could not write the response: {e}");
        }
        drop(permit);
    });
    if let Err(e) = spawned {
        log::error!("cannot start a writer thread: {e}");
    }
}

/// Answers and ends the connection without reading the request's body: the response, with
/// `Connection: close`, goes out in its turn (after those of earlier requests on the
/// connection), then the socket is shut, so tiny_http's drain of the unread body and its
/// wait for a next request both end at once.
fn respond_and_close(
    request: tiny_http::Request,
    status: u16,
    headers: Vec<tiny_http::Header>,
    body: &[u8],
    port: u16,
) {
    let socket = request.remote_addr().and_then(|peer| super::sockets::find_socket(*peer, port));
    let reason = tiny_http::StatusCode(status).default_reason_phrase();
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for header in &headers {
        head.push_str(&format!("{}: {}\r\n", header.field, header.value));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    // Reading ends first: tiny_http drains an unread body when the request goes (inside
    // into_writer). Every earlier request on the connection has been read to its end.
    if let Some(socket) = &socket {
        super::sockets::stop_reading(socket);
    }
    let body = if *request.method() == tiny_http::Method::Head { &[] } else { body };
    // tiny_http's writer of this request: it waits for the responses before it.
    let mut writer = request.into_writer();
    let written = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body)).and_then(|()| writer.flush());
    if let Err(e) = written {
        log::debug!("could not answer a request before closing its connection: {e}");
    }
    if let Some(socket) = &socket {
        super::sockets::shut(socket);
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
    /// tiny_http_fork 0.12.17's read errors, as it prints them: only the end of a connection
    /// is not logged as a refusal.
    #[test]
    fn a_connection_ending_is_told_from_a_refused_request() {
        assert!(super::connection_ended("[ReadIoError] Unexpected EOF"));
        assert!(super::connection_ended("[ReadIoError] Connection reset by peer (os error 104)"));
        assert!(!super::connection_ended("[ReadIoError] Header is not in ASCII"));
        assert!(!super::connection_ended("[WrongRequestLine]"));
    }

    #[test]
    fn header_values_with_line_breaks_are_refused() {
        assert!(super::safe_header("X-Test", "a\r\nSet-Cookie: x=1").is_none());
        assert!(super::safe_header("X-Test", "fine").is_some());
    }
}
