//! Cuts connections that send more than any one request could hold without being answered.
//!
//! tiny_http reads a request head into a buffer that grows until CRLF, with no limit on a
//! line or on the number of lines. One client sending an endless header line took the
//! process from 10 MB to 1 GB in 3 s on loopback, until the allocator aborted it. The head
//! is read on tiny_http's own connection threads, out of this program's reach, so the guard
//! watches from outside, at no cost while memory stays put:
//! - every [`TICK`] it reads the process's resident size;
//! - after it grew by [`GROWTH`] since the last look at the connections, it asks the kernel
//!   how many bytes each connection of the server received (`TCP_INFO`);
//! - a connection that received more than `allowance` (a whole request: `max_body_bytes`
//!   plus 1 MiB of head) since the server last sent it anything is shut down. Its reader
//!   sees the end, and tiny_http drops the buffer.
//!
//! Memory can grow only as fast as tiny_http's threads read (a few hundred MB/s on two
//! cores), so an attack is cut after tens of MB. Every legitimate request is answered
//! before another whole request's worth of bytes arrives.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::server::HttpMetrics;

/// How often the resident size is read (a few microseconds each time).
pub const TICK: Duration = Duration::from_millis(100);

/// Growth of the resident size, since the last look, that makes the guard look again.
pub const GROWTH: u64 = 16 << 20;

/// Head bytes a request may need beyond its body (tiny_http sets no limit; 1 MiB is far
/// beyond any browser's or proxy's).
pub const HEAD_ALLOWANCE: u64 = 1 << 20;

/// Starts the guard of the server listening on `port`; it ends when `stop` is signalled or
/// dropped. Each connection it cuts is counted in `metrics`.
pub fn start(
    port: u16,
    allowance: u64,
    metrics: Arc<HttpMetrics>,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("http-guard".into()).spawn(move || {
        let mut looked_at = resident_bytes();
        let mut seen = HashMap::new();
        loop {
            match stop.recv_timeout(TICK) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = resident_bytes();
            if now < looked_at {
                looked_at = now; // memory came back: growth counts from here
            } else if now - looked_at >= GROWTH {
                looked_at = now;
                seen = look(port, allowance, &seen, &metrics);
            }
        }
    })
}

/// What the guard knew of a connection at its last look.
#[derive(Clone, Copy)]
struct Seen {
    /// Bytes the server had sent that the peer acknowledged.
    answered: u64,
    /// Bytes received up to the last time the server was seen sending it something.
    received_when_answered: u64,
    /// Shut down by the guard (its descriptors not closed yet).
    cut: bool,
}

/// Looks at every connection on `port` (by peer: tiny_http holds two descriptors of each),
/// shuts those over `allowance`, and returns what it saw for the next look.
fn look(
    port: u16,
    allowance: u64,
    before: &HashMap<SocketAddr, Seen>,
    metrics: &HttpMetrics,
) -> HashMap<SocketAddr, Seen> {
    let mut now = HashMap::new();
    super::sockets::each_connection(port, |_, socket| {
        let (Some((received, answered)), Ok(peer)) = (traffic(socket), socket.peer_addr()) else {
            return;
        };
        if now.contains_key(&peer) {
            return;
        }
        let last = before.get(&peer);
        if let Some(cut @ Seen { cut: true, .. }) = last {
            now.insert(peer, *cut);
            return;
        }
        // Seen before and sent nothing since: the unanswered bytes count from back then.
        // Never answered: from its first byte.
        let received_when_answered = match last {
            Some(s) if s.answered == answered => s.received_when_answered,
            Some(_) => received,
            None if answered == 0 => 0,
            None => received,
        };
        let unanswered = received.saturating_sub(received_when_answered);
        let cut = unanswered > allowance;
        if cut {
            super::sockets::abort(socket);
            metrics.connection_cut();
            log::warn!("cut a connection from {peer}: it sent {unanswered} bytes that made no request");
        }
        now.insert(peer, Seen { answered, received_when_answered, cut });
    });
    now
}

/// Bytes a connection received and bytes it sent that were acknowledged, from the kernel.
fn traffic(socket: &TcpStream) -> Option<(u64, u64)> {
    // SAFETY: tcp_info is plain data (zeroes are valid); getsockopt writes at most `len`
    // bytes into it and says how many.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let got = libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (got == 0).then_some((info.tcpi_bytes_received, info.tcpi_bytes_acked))
    }
}

/// This process's resident size in bytes (0 when it cannot be read: then the guard never
/// looks, as before it existed).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn the_kernel_counts_what_a_connection_received_and_what_it_was_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(&[b'a'; 5000]).expect("send");
        let mut buf = vec![0; 5000];
        server.read_exact(&mut buf).expect("read");
        assert_eq!(traffic(&server), Some((5000, 0)), "received all, never answered");
        server.write_all(b"ok").expect("answer");
        client.read_exact(&mut [0; 2]).expect("read the answer");
        let answered = (0..100).find_map(|_| {
            let (_, answered) = traffic(&server)?;
            if answered < 2 {
                std::thread::sleep(Duration::from_millis(10)); // the ack is on its way
            }
            (answered >= 2).then_some(answered)
        });
        assert!(answered.is_some(), "the answer counts once acknowledged");
        assert!(resident_bytes() > 0);
    }
}
