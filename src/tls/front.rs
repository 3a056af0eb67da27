//! TLS termination in front of the plain HTTP server, for `serve` and `runtime` with
//! `tls_cert_file`/`tls_key_file`.
//!
//! tiny_http's own TLS (`ssl-rustls`) takes rustls with its default features: aws-lc-rs (a
//! C/cmake build) next to ring, and the unmaintained rustls-pemfile. So the HTTP server
//! listens on loopback instead, and this front accepts the public connections: one thread
//! per connection runs the handshake, connects to the server and moves bytes both ways in
//! one `poll()` loop. The server sees an ordinary connection, so everything it does
//! (keep-alive, timeouts, WebSocket upgrades, closing) works unchanged over TLS.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::{ServerConfig, ServerConnection};

use crate::http::error::ApiError;
use crate::http::server::next_request_id;
use crate::http::sockets::{CONNECTION_TIMEOUT, listen, reachable};

/// Time a client has, in all, to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a plain-HTTP client, answered, has to finish sending before its connection closes.
const PLAIN_HTTP_LINGER: Duration = Duration::from_secs(1);

/// Connections from one address still in their handshake (or being told to use HTTPS), at
/// most: one client cannot hold every connection, thread and descriptor with handshakes it
/// never finishes. A browser opens a handful at a time.
const MAX_HANDSHAKES_PER_PEER: usize = 64;

/// Connections from one address at most, handshakes done or not: a quarter of them all, so
/// one client holding connections open cannot shut every other out (a gateway watching
/// hundreds of a runtime's workers holds one per worker).
const MAX_CONNECTIONS_PER_PEER: usize = MAX_CONNECTIONS / 4;

/// TLS connections relayed at once; past it, new ones are closed at once.
const MAX_CONNECTIONS: usize = 4096;

/// Bytes moved per read, and the most plaintext held for the server before the client's
/// side is no longer read (backpressure).
const CHUNK: usize = 16 << 10;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The certificate chain and key `serve`/`runtime` present.
#[derive(Clone)]
pub struct ServerTls(Arc<ServerConfig>);

impl ServerTls {
    /// Loads `cert` (PEM chain, leaf first) and `key` (PEM); `None` when neither is set.
    /// Errors name the setting and the file.
    pub fn load(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Option<ServerTls>> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => bail!("TLS needs a key too: set tls_key_file (or --tls-key)"),
            (None, Some(_)) => bail!("TLS needs a certificate too: set tls_cert_file (or --tls-cert)"),
        };
        let chain = super::read_certificates(cert, "tls_cert_file")?;
        let private_key = super::read_private_key(key, "tls_key_file")?;
        let config = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .with_context(|| {
                format!("tls_key_file: {} does not fit the certificate in {}", key.display(), cert.display())
            })?;
        Ok(Some(ServerTls(Arc::new(config))))
    }
}

/// A running TLS front; [`Front::stop`] ends it.
pub struct Front {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Front {
    /// Listens on `bind` and relays every connection, decrypted, to the server at `server`.
    pub fn start(bind: SocketAddr, server: SocketAddr, tls: ServerTls) -> io::Result<Front> {
        let listener = listen(bind)?;
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let acceptor = std::thread::Builder::new()
            .name("tls-acceptor".into())
            .spawn(move || accept_loop(&listener, server, &tls, &flag))?;
        Ok(Front { addr, stopping, acceptor: Some(acceptor) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting; connections already relayed end with their server side.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor from accept().
        drop(TcpStream::connect_timeout(&reachable(self.addr), Duration::from_secs(1)));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, server: SocketAddr, tls: &ServerTls, stopping: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    let peers = Arc::new(Peers::default());
    let (mut turned_away, mut accept_failed) = (Throttled::default(), Throttled::default());
    while !stopping.load(Ordering::SeqCst) {
        let (client, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // The listener's receive timeout bounds accept(); nothing arrived meanwhile.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(e) => {
                // Out of descriptors, most often: said once in a while, not at every retry.
                accept_failed.tell(log::Level::Error, format_args!("TLS acceptor: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let handshake = match peers.begin(peer.ip()) {
            Ok(handshake) => handshake,
            Err(full) => {
                let ip = peer.ip();
                turned_away.tell(log::Level::Warn, format_args!("{full} ({ip}): closed a new connection from it"));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            turned_away.tell(
                log::Level::Warn,
                format_args!("all {MAX_CONNECTIONS} TLS connections are in use: closed a new one"),
            );
            continue;
        }
        let (config, count) = (tls.0.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("tls-relay".into()).spawn(move || {
            if let Err(e) = relay(client, server, config, handshake) {
                log::debug!("TLS connection ended: {e}");
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a TLS relay thread: {e}");
        }
    }
}

/// Connections, and those of them still in their handshake, by the address they come from.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, PeerCount>>);

#[derive(Default)]
struct PeerCount {
    connections: usize,
    handshakes: usize,
}

/// One connection's place in [`Peers`] (and, until [`PeerSlot::handshake_done`], its
/// handshake's), given back when it is dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    peer: IpAddr,
    handshaking: bool,
}

impl Peers {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, PeerCount>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `peer`, or what it already holds too much of.
    fn begin(self: &Arc<Self>, peer: IpAddr) -> Result<PeerSlot, String> {
        let mut peers = self.lock();
        let count = peers.entry(peer).or_default();
        if count.connections >= MAX_CONNECTIONS_PER_PEER {
            return Err(format!("one address holds {MAX_CONNECTIONS_PER_PEER} TLS connections"));
        }
        if count.handshakes >= MAX_HANDSHAKES_PER_PEER {
            return Err(format!("one address has {MAX_HANDSHAKES_PER_PEER} TLS handshakes under way"));
        }
        count.connections += 1;
        count.handshakes += 1;
        Ok(PeerSlot { peers: self.clone(), peer, handshaking: true })
    }
}

impl PeerSlot {
    /// The handshake is over: its place is free for another of the address's.
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.peers.lock().entry(self.peer).or_default().handshakes -= 1;
        }
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.handshake_done();
        let mut peers = self.peers.lock();
        if let Some(count) = peers.get_mut(&self.peer) {
            count.connections -= 1;
            if count.connections == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// A warning that may come many times a second (connections closed for want of room, an
/// acceptor out of descriptors), said at most every 10 s with how often it came: a flood
/// of them must not become a flood of log lines.
#[derive(Default)]
struct Throttled {
    last_told: Option<Instant>,
    untold: u64,
}

impl Throttled {
    fn tell(&mut self, level: log::Level, what: std::fmt::Arguments<'_>) {
        self.untold += 1;
        if self.last_told.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            match self.untold {
                1 => log::log!(level, "{what}"),
                n => log::log!(level, "{what} ({n} times since it was last said)"),
            }
            (self.last_told, self.untold) = (Some(Instant::now()), 0);
        }
    }
}

/// Handshake, then relay until either side is done.
fn relay(mut client: TcpStream, server: SocketAddr, config: Arc<ServerConfig>, mut slot: PeerSlot) -> io::Result<()> {
    // A deadline for the whole handshake, not per read: a client trickling its hello a byte
    // at a time must not keep the connection (and its thread) for longer.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    client.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    client.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut first = [0u8; 1];
    match client.peek(&mut first)? {
        0 => return Ok(()),
        _ if first[0] != TLS_HANDSHAKE_RECORD => return refuse_plain_http(&mut client, deadline),
        _ => {}
    }
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    // One read at a time (rustls's `complete_io` would loop until the handshake is done).
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut client)?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "the TLS handshake took too long"));
        }
        client.set_read_timeout(Some(left))?;
        if conn.read_tls(&mut client)? == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "closed during the TLS handshake"));
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the client why (the alert rustls queued), then give up.
            let _ = conn.write_tls(&mut client);
            return Err(io::Error::new(ErrorKind::InvalidData, e));
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut client)?;
    }
    slot.handshake_done();
    let inner = TcpStream::connect_timeout(&server, HANDSHAKE_TIMEOUT)?;
    for socket in [&client, &inner] {
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
    }
    // `slot` is held until the relay ends: the connection counts for its address till then.
    Relay { conn, client, inner, to_server: Vec::new(), client_done: false, server_done: false }.run()
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says so, then closes. The
/// body is the API's error envelope, so a gateway pointed at `http://` passes the reason on.
/// The whole exchange ends by `deadline` (the handshake's) and a second after the answer.
fn refuse_plain_http(client: &mut TcpStream, deadline: Instant) -> io::Result<()> {
    let id = next_request_id();
    let error = ApiError::bad_request("invalid_request", "this port speaks HTTPS: use https://");
    let body = error.to_json(&id).to_string();
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Request-Id: {id}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes())?;
    client.write_all(body.as_bytes())?;
    // Closing with unread request bytes would reset the connection before the client reads
    // the answer: end our side, then read what is left, for a moment at most.
    client.shutdown(Shutdown::Write)?;
    let deadline = deadline.min(Instant::now() + PLAIN_HTTP_LINGER);
    let mut sink = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        client.set_read_timeout(Some(left))?;
        if !matches!(client.read(&mut sink), Ok(n) if n > 0) {
            return Ok(());
        }
    }
}

/// One relayed connection after its handshake.
struct Relay {
    conn: ServerConnection,
    client: TcpStream,
    inner: TcpStream,
    /// Plaintext from the client not yet written to the server.
    to_server: Vec<u8>,
    /// The client sent its last byte (close_notify or EOF).
    client_done: bool,
    /// The server closed its side.
    server_done: bool,
}

impl Relay {
    fn run(mut self) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        let mut server_write_shut = false;
        loop {
            self.take_plaintext()?;
            self.flush_client()?;
            if !self.to_server.is_empty() {
                match self.inner.write(&self.to_server) {
                    Ok(n) => drop(self.to_server.drain(..n)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if self.client_done && self.to_server.is_empty() && !server_write_shut {
                self.inner.shutdown(Shutdown::Write)?;
                server_write_shut = true;
            }
            if self.server_done && !self.conn.wants_write() {
                return Ok(());
            }
            let client_in = !self.client_done && self.to_server.len() < 4 * CHUNK;
            let client_out = self.conn.wants_write();
            let server_in = !self.server_done && !client_out;
            let server_out = !self.to_server.is_empty();
            if !(client_in || client_out || server_in || server_out) {
                return Ok(());
            }
            // Waiting with bytes pending is bounded like any connection's writes; with
            // nothing pending, the server's own timeouts decide when the connection ends.
            let pending = client_out || server_out;
            let (client_ready, server_ready) = wait(
                (&self.client, client_in, client_out),
                (&self.inner, server_in, server_out),
                pending.then_some(CONNECTION_TIMEOUT),
            )?;
            if client_ready && client_in {
                match self.conn.read_tls(&mut self.client) {
                    Ok(0) => self.client_done = true,
                    Ok(_) => {
                        let state = self.conn.process_new_packets().map_err(|e| {
                            let _ = self.conn.write_tls(&mut self.client); // the alert
                            io::Error::new(ErrorKind::InvalidData, e)
                        })?;
                        self.client_done |= state.peer_has_closed();
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if server_ready && server_in {
                match self.inner.read(&mut buf) {
                    Ok(0) => self.server_closed(),
                    Ok(n) => self.conn.writer().write_all(&buf[..n])?,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => self.server_closed(),
                }
            }
        }
    }

    /// Moves the plaintext rustls has decrypted into `to_server`.
    fn take_plaintext(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match self.conn.reader().read(&mut buf) {
                Ok(0) => {
                    self.client_done = true;
                    return Ok(());
                }
                Ok(n) => self.to_server.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                // Closed without close_notify: what arrived is passed on, then the end.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    self.client_done = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the TLS records rustls has ready, as far as the client takes them now.
    fn flush_client(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.client) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn server_closed(&mut self) {
        self.server_done = true;
        self.conn.send_close_notify();
    }
}

/// Sleeps in `poll()` until one of the two sockets is ready for what is asked of it (a
/// socket asked for nothing is left out); `Err(TimedOut)` when `timeout` passes first.
fn wait(
    client: (&TcpStream, bool, bool),
    server: (&TcpStream, bool, bool),
    timeout: Option<Duration>,
) -> io::Result<(bool, bool)> {
    let pollfd = |(socket, read, write): (&TcpStream, bool, bool)| {
        let events = if read { libc::POLLIN } else { 0 } | if write { libc::POLLOUT } else { 0 };
        libc::pollfd { fd: if events == 0 { -1 } else { socket.as_raw_fd() }, events, revents: 0 }
    };
    let mut fds = [pollfd(client), pollfd(server)];
    let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        match n {
            0 => return Err(io::Error::new(ErrorKind::TimedOut, "a TLS connection stalled")),
            n if n > 0 => return Ok((fds[0].revents != 0, fds[1].revents != 0)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_a_bounded_share_of_handshakes_and_connections() {
        let peers = Arc::new(Peers::default());
        let (one, other): (IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());
        let begin = |peer| peers.begin(peer).unwrap_or_else(|full| panic!("{full}"));
        let mut handshaking: Vec<PeerSlot> = (0..MAX_HANDSHAKES_PER_PEER).map(|_| begin(one)).collect();
        assert!(peers.begin(one).err().is_some_and(|full| full.contains("64 TLS handshakes")));
        assert!(peers.begin(other).is_ok(), "another address is not held up");
        // Handshakes done free their places, not the connections'.
        let mut held = Vec::new();
        while held.len() < MAX_CONNECTIONS_PER_PEER {
            let mut slot = handshaking.pop().unwrap_or_else(|| begin(one));
            slot.handshake_done();
            held.push(slot);
        }
        assert!(peers.begin(one).err().is_some_and(|full| full.contains("1024 TLS connections")));
        held.pop();
        assert!(peers.begin(one).is_ok(), "a connection that ended gives its place back");
        drop(held);
        assert!(peers.lock().get(&one).is_none_or(|count| count.connections <= 1), "nothing left over");
    }

    #[test]
    fn cert_and_key_come_together_and_errors_name_the_file() {
        let only_cert = ServerTls::load(Some(Path::new("c.pem")), None).err().map(|e| e.to_string());
        assert!(only_cert.is_some_and(|e| e.contains("tls_key_file")));
        let only_key = ServerTls::load(None, Some(Path::new("k.pem"))).err().map(|e| e.to_string());
        assert!(only_key.is_some_and(|e| e.contains("tls_cert_file")));
        assert!(ServerTls::load(None, None).is_ok_and(|t| t.is_none()));
        let missing = ServerTls::load(Some(Path::new("/nonexistent/cert.pem")), Some(Path::new("/nonexistent/k.pem")));
        let error = missing.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("tls_cert_file") && error.contains("/nonexistent/cert.pem"), "{error}");
    }
}
