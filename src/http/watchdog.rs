//! A self-probe that keeps tiny_http's connection pool moving.
//!
//! tiny_http's `TaskPool::spawn` queues a new connection when it sees a waiting thread,
//! but a thread that was notified and has not yet woken still counts as waiting: in a burst,
//! several connections queue behind one wake-up and sit there until some thread finishes a
//! connection — minutes, when threads are held by slow upstreams or keep-alive clients.
//! Any connection tiny_http serves quickly frees a thread that then takes
//! the oldest queued one, so this watchdog sends a cheap probe request every
//! [`PROBE_INTERVAL`]; when the probe itself is slow (it was queued too), it opens a burst
//! of connect-and-close "kicks", each of which frees one stranded connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::server::Listener;

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// The path the watchdog requests; answered `204` by the server, never logged.
pub const PROBE_PATH: &str = "/.well-known/worker-gateway/probe";

/// Time between probes while all is well. Each probe is a new connection, and every new
/// connection wakes one of tiny_http's idle connection threads; probing much more often
/// would keep every thread a burst ever started awake (they end after 5 s idle).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(1000);

/// A probe slower than this means connections are queued inside tiny_http.
const PROBE_BUDGET: Duration = Duration::from_millis(200);

/// Connections opened (and closed) when a probe was slow.
const KICKS: usize = 32;

/// Probes refused in a row before the acceptor counts as dead and the server rebinds.
const REFUSALS_BEFORE_REBIND: u32 = 3;

/// Time between probes once one was refused: nobody is listening, so every moment counts
/// (tiny_http's accept thread dies when the process runs out of descriptors).
const REFUSED_INTERVAL: Duration = Duration::from_millis(50);

/// Starts the watchdog for `listener`; it ends when `stop` is signalled or dropped. Besides
/// keeping tiny_http's pool moving, it rebinds when connections are refused (tiny_http's
/// accept thread died), and its probes keep `accept()` from reaching its timeout
/// ([`super::sockets::listen`]).
pub fn start(listener: Arc<Listener>, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
    let addr = listener.addr();
    let target = super::sockets::reachable(addr);
    std::thread::Builder::new().name("http-watchdog".into()).spawn(move || {
        let mut refusals = 0;
        loop {
            let pause = match probe(target) {
                Probe::Answered => {
                    refusals = 0;
                    PROBE_INTERVAL
                }
                Probe::Refused => {
                    refusals += 1;
                    if refusals >= REFUSALS_BEFORE_REBIND {
                        match listener.rebind() {
                            Ok(()) => refusals = 0,
                            Err(e) => log::error!("{e:#}"),
                        }
                    }
                    REFUSED_INTERVAL
                }
                Probe::Slow => kick(target),
            };
            match stop.recv_timeout(pause) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    })
}

/// What a probe found.
enum Probe {
    /// Answered in time.
    Answered,
    /// Nobody listens: the acceptor died.
    Refused,
    /// Slow, or failed for another reason (descriptors exhausted, queued in the pool).
    Slow,
}

/// One probe request.
fn probe(target: SocketAddr) -> Probe {
    let mut stream = match TcpStream::connect_timeout(&target, PROBE_BUDGET) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Probe::Refused,
        Err(_) => return Probe::Slow,
    };
    let mut attempt = || -> std::io::Result<bool> {
        stream.set_read_timeout(Some(PROBE_BUDGET))?;
        stream.set_write_timeout(Some(PROBE_BUDGET))?;
        write!(stream, "GET {PROBE_PATH} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 204"))
    };
    if attempt().unwrap_or(false) { Probe::Answered } else { Probe::Slow }
}

/// Opens and closes [`KICKS`] connections; returns how long to wait before the next probe.
fn kick(target: SocketAddr) -> Duration {
    for _ in 0..KICKS {
        drop(TcpStream::connect_timeout(&target, PROBE_BUDGET));
    }
    log::debug!("http watchdog: a probe was slow; kicked the connection pool");
    Duration::from_millis(10)
}
