//! What tiny_http does not do for its sockets, done from outside: find an accepted socket
//! (to poll it or set timeouts), give every accepted socket read/write timeouts, raise the
//! descriptor limit.
//!
//! tiny_http exposes no socket and sets no timeout, so idle keep-alive connections,
//! slowloris headers and clients that never read their response would each hold a thread
//! forever. The sockets are found by scanning `/proc/self/fd` for TCP sockets on our port.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

/// Read and write timeout given to every accepted connection that has none.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Our TCP sockets on `local_port` (dups; dropping them does not close the connection).
fn sockets_on(local_port: u16) -> impl Iterator<Item = TcpStream> {
    let dir = std::fs::read_dir("/proc/self/fd").or_else(|_| std::fs::read_dir("/dev/fd")).ok();
    dir.into_iter().flatten().flatten().filter_map(move |entry| {
        let fd = entry.file_name().to_str()?.parse::<RawFd>().ok()?;
        // SAFETY: the descriptor is only dup'ed here; the dup is owned by the TcpStream and
        // checked before use (a descriptor closed or reused meanwhile fails the checks).
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()?;
        let stream = TcpStream::from(owned);
        let ours = stream.local_addr().ok()?.port() == local_port && stream.peer_addr().is_ok();
        ours.then_some(stream)
    })
}

/// The accepted connection from `peer` on our `local_port`.
pub fn find_socket(peer: SocketAddr, local_port: u16) -> Option<TcpStream> {
    sockets_on(local_port).find(|s| s.peer_addr().ok() == Some(peer))
}

/// Gives every accepted connection on `local_port` without timeouts [`CONNECTION_TIMEOUT`]
/// for reads and writes (WebSocket sessions set their own and are left alone).
pub fn sweep_timeouts(local_port: u16) {
    for socket in sockets_on(local_port) {
        if socket.read_timeout().ok().flatten().is_none() {
            let _ = socket.set_read_timeout(Some(CONNECTION_TIMEOUT));
        }
        if socket.write_timeout().ok().flatten().is_none() {
            let _ = socket.set_write_timeout(Some(CONNECTION_TIMEOUT));
        }
    }
}

/// Raises the soft descriptor limit to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit fill and read a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return None;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// Shuts a connection down both ways (the peer sees the end at once).
pub fn shut(socket: &TcpStream) {
    // SAFETY: shutdown on a descriptor we hold; no memory involved.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
}
