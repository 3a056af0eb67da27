//! What tiny_http does not do for its sockets, done from outside: give every accepted socket
//! read/write timeouts, find an accepted socket (to shut it, or to take an upgraded
//! connection over), raise the descriptor limit.
//!
//! tiny_http exposes no socket and sets no timeout, so idle keep-alive connections,
//! slowloris headers and clients that never read their response would each hold a thread
//! forever. The timeouts (and `TCP_NODELAY`) are set on the listening socket, which Linux
//! copies to every socket it accepts; a socket is found by scanning `/proc/self/fd` for TCP
//! sockets on our port.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// Read and write timeout of every accepted connection (set on the listener, see [`listen`]).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Held while the descriptors are searched: one search never sees another's dups (which
/// [`take_over`] would take for tiny_http's).
static SEARCH: Mutex<()> = Mutex::new(());

/// The highest descriptor the last search saw. A connection just accepted has the lowest
/// free numbers, usually close to it, so a search looks at the descriptors near it first and
/// lists the others (thousands, with thousands of WebSocket sessions) only when needed.
static TOP: AtomicI32 = AtomicI32::new(0);

/// How far below [`TOP`] the first look starts.
const NEAR_TOP: RawFd = 256;

/// Our TCP sockets on `local_port`: each descriptor and a dup of it (dropping the dup does
/// not close the connection), those near [`TOP`] first, each part newest first. Callers hold
/// [`SEARCH`].
fn sockets_on(local_port: u16) -> impl Iterator<Item = (RawFd, TcpStream)> {
    let start = (TOP.load(Ordering::Relaxed) - NEAR_TOP).max(0);
    let near = open_fds_from(start);
    TOP.store(near.last().copied().unwrap_or(start), Ordering::Relaxed);
    let below = std::iter::once(near.clone()).flat_map(|near| {
        let all = open_fds_from(0);
        TOP.store(all.last().copied().unwrap_or(0), Ordering::Relaxed);
        all.into_iter().rev().filter(move |fd| near.binary_search(fd).is_err())
    });
    near.into_iter().rev().chain(below).filter_map(move |fd| {
        // SAFETY: the descriptor is only dup'ed here; the dup is owned by the TcpStream and
        // checked before use (a descriptor closed or reused meanwhile fails the checks).
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()?;
        let stream = TcpStream::from(owned);
        let ours = stream.local_addr().ok()?.port() == local_port && stream.peer_addr().is_ok();
        ours.then_some((fd, stream))
    })
}

/// This process's descriptors from `from` up, ascending. `/proc/self/fd` lists them in order
/// and its positions are descriptor numbers + 2 (after `.` and `..`), so the listing starts
/// at `from` rather than at 0.
fn open_fds_from(from: RawFd) -> Vec<RawFd> {
    let mut fds = Vec::new();
    // SAFETY: a directory stream opened, read and closed here; each entry is read before
    // the next readdir call.
    unsafe {
        let dir = libc::opendir(c"/proc/self/fd".as_ptr());
        if dir.is_null() {
            return fds;
        }
        libc::seekdir(dir, libc::c_long::from(from) + 2);
        loop {
            let entry = libc::readdir(dir);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            fds.extend(name.to_str().ok().and_then(|n| n.parse::<RawFd>().ok()).filter(|fd| *fd >= from));
        }
        libc::closedir(dir);
    }
    fds
}

/// Calls `f` with each of our TCP connections on `local_port` (its descriptor and a dup),
/// under [`SEARCH`]. Out of descriptors, where a search has none to list the descriptors or
/// to dup one, it looks at every possible descriptor and each connection's own: the guard
/// must still see the connections then, to close what gives descriptors back (see
/// [`super::guard::STUCK_AFTER`]).
pub fn each_connection(local_port: u16, mut f: impl FnMut(RawFd, &TcpStream)) {
    let _searching = SEARCH.lock().unwrap_or_else(|p| p.into_inner());
    // A few to spare: the listing takes one, then each dup one, while other threads take theirs.
    if descriptor_limit().zip(open_descriptors()).is_none_or(|(limit, open)| open + 4 < limit) {
        for (fd, socket) in sockets_on(local_port) {
            f(fd, &socket);
        }
        return;
    }
    let highest = descriptor_limit().map_or(0, |limit| RawFd::try_from(limit).unwrap_or(RawFd::MAX));
    for fd in 0..highest {
        // SAFETY: F_GETFD only asks whether the number is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: the descriptor is borrowed for the call and never closed here (ManuallyDrop);
        // a number closed or reused meanwhile fails the checks or names another socket.
        let socket = std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
        if socket.local_addr().is_ok_and(|a| a.port() == local_port) && socket.peer_addr().is_ok() {
            f(fd, &socket);
        }
    }
}

/// The accepted connection from `peer` on our `local_port`.
pub fn find_socket(peer: SocketAddr, local_port: u16) -> Option<TcpStream> {
    let _searching = SEARCH.lock().unwrap_or_else(|p| p.into_inner());
    sockets_on(local_port).find(|(_, s)| s.peer_addr().ok() == Some(peer)).map(|(_, s)| s)
}

/// Takes the connection from `peer` on our `local_port` away from tiny_http, which must still
/// hold it (an upgraded stream not yet dropped). tiny_http would keep a thread blocked for the
/// connection's life and shut the socket down when it lets go, so its descriptors of the
/// connection are pointed at `/dev/null` instead: when tiny_http drops its stream, it shuts
/// down and closes those, its thread is free, and the returned socket — the only descriptor
/// of the connection left — is the caller's.
pub fn take_over(peer: SocketAddr, local_port: u16) -> io::Result<TcpStream> {
    let _searching = SEARCH.lock().unwrap_or_else(|p| p.into_inner());
    let (mut theirs, mut dups): (Vec<RawFd>, Vec<TcpStream>) = (Vec::new(), Vec::new());
    for (fd, dup) in sockets_on(local_port).filter(|(_, s)| s.peer_addr().ok() == Some(peer)) {
        // A number closed during the scan and handed to one of our dups is not tiny_http's.
        if dups.iter().any(|d| d.as_raw_fd() == fd) {
            continue;
        }
        theirs.push(fd);
        dups.push(dup);
        // tiny_http holds two: the accepted socket and a clone (for reading and for writing).
        if theirs.len() == 2 {
            break;
        }
    }
    let ours = dups.into_iter().next().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such connection"))?;
    let null = std::fs::File::open("/dev/null")?;
    for fd in theirs {
        // SAFETY: `fd` is tiny_http's descriptor of this connection, kept open by the stream
        // the caller holds; dup3 atomically makes it refer to /dev/null instead.
        if unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(ours)
}

/// Listens on `addr` with [`CONNECTION_TIMEOUT`] as the read and write timeout of every
/// connection it accepts: Linux copies both from the listening socket, so a connection has
/// them from its first byte (a WebSocket session, taken over, is non-blocking instead).
///
/// The read timeout also bounds `accept()`. The watchdog connects every second, so an accept
/// never waits that long; if one ever does, tiny_http's accept thread ends and the watchdog
/// rebinds, as after EMFILE.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    let timeout = libc::timeval { tv_sec: CONNECTION_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        set_option(&listener, libc::SOL_SOCKET, option, &timeout)?;
    }
    // tiny_http writes a response's head and body apart: with Nagle's algorithm the body
    // then waits for the ack of the head, which the client delays (40 ms on Linux), on every
    // response past the first on a connection that does not fit one write.
    set_option(&listener, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1 as &libc::c_int)?;
    Ok(listener)
}

/// Sets a socket option of `listener` (which Linux copies to every socket it accepts).
fn set_option<T>(socket: &impl AsRawFd, level: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes of a live value, on a descriptor we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Descriptors kept for what is not a session or a stream (the listener, HTTP connections,
/// two each, upstream connections, stores and logs): half the limit, within these.
const DESCRIPTOR_RESERVE: std::ops::RangeInclusive<usize> = 32..=1024;

/// The process's soft descriptor limit (`None` when it cannot be read).
pub fn descriptor_limit() -> Option<usize> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then(|| usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}

/// Descriptors this process has open, from the size Linux (6.2 and later) gives
/// `/proc/self/fd`: one `stat`, cheap enough for every tick of the guard. `None` where the
/// kernel does not tell.
pub fn open_descriptors() -> Option<usize> {
    let size = std::fs::metadata("/proc/self/fd").ok()?.len();
    usize::try_from(size).ok().filter(|&open| open > 0)
}

/// Whether the process's open descriptors are within an eighth of its limit (at least 16)
/// of it: then the guard closes idle connections at once, and a listener that died of
/// running out waits for it to before listening again. False where the kernel does not tell.
pub fn descriptors_short() -> bool {
    let (Some(limit), Some(open)) = (descriptor_limit(), open_descriptors()) else { return false };
    let short = open + (limit / 8).max(16) >= limit;
    WERE_SHORT.store(short, Ordering::Relaxed);
    short
}

/// Whether `e` says the process (or the system) has no descriptor left: a moment's
/// overload of this process, not a failure of what it was opening or reaching.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What [`descriptors_short`] last found (the guard asks every 50 ms).
static WERE_SHORT: AtomicBool = AtomicBool::new(false);

/// What [`descriptors_short`] last found, without asking the kernel again: for work done
/// often (a journal append, once per event), which can then hold fewer descriptors.
pub fn descriptors_were_short() -> bool {
    WERE_SHORT.load(Ordering::Relaxed)
}

/// Descriptors this process may give WebSocket sessions and event streams: its soft limit
/// less half of it (at least 32, at most 1 024: see [`DESCRIPTOR_RESERVE`]). Otherwise what
/// one client holds open could take every descriptor, and with them every HTTP request.
/// Unbounded when the limit cannot be read.
pub fn descriptor_budget() -> usize {
    let Some(limit) = descriptor_limit() else { return usize::MAX };
    limit.saturating_sub((limit / 2).clamp(*DESCRIPTOR_RESERVE.start(), *DESCRIPTOR_RESERVE.end()))
}

/// Descriptors connections kept open between calls to remote runtimes may hold, all
/// together: a quarter of what [`descriptor_budget`] leaves for everything else (which
/// also holds the connections in use), and half of what sessions and streams leave of
/// their budget (`granted` to them). Unbounded when the limit cannot be read.
pub fn idle_connection_allowance(granted: usize) -> usize {
    let Some(limit) = descriptor_limit() else { return usize::MAX };
    let budget = descriptor_budget();
    (limit - budget) / 4 + budget.saturating_sub(granted) / 2
}

/// `configured` (config key `key`, `default` unless set), lowered to `allowed` when it does
/// not fit the descriptor limit: a warning when it was set, a note when it is the default (a
/// machine with a low limit is not misconfigured).
pub fn fit_descriptors(key: &str, configured: usize, default: usize, allowed: usize) -> usize {
    if allowed < configured {
        let level = if configured == default && allowed > 0 { log::Level::Info } else { log::Level::Warn };
        log::log!(
            level,
            "{key} lowered from {configured} to {allowed} to fit the open file limit \
             (raise it: ulimit -n, or LimitNOFILE= under systemd)"
        );
    }
    configured.min(allowed)
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

/// The address this process connects to for a listener bound to `addr`: the bind address,
/// or loopback for an unspecified bind.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Ends a connection the peer abuses: shut down now, and reset (not closed in order) when
/// its last descriptor closes, so a peer blocked sending learns at once that nobody reads.
pub fn abort(socket: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    if let Err(e) = set_option(socket, libc::SOL_SOCKET, libc::SO_LINGER, &linger) {
        log::debug!("cannot set SO_LINGER on a connection being cut: {e}");
    }
    shut(socket);
}

/// Closes descriptor `fd` when it still names a connection on our `local_port` that is no
/// longer open both ways: reset, or, still with `peer`, closed by it or shut down by the
/// guard. One the guard found abandoned, whose tiny_http thread, stuck for good, will never
/// use or close it again (see [`super::guard::STUCK_AFTER`]): it would hold the connection,
/// a descriptor and what waits in its buffers for the life of the process. Closed with a
/// reset (the guard's cut set it to), which frees the peer's side too. True if closed.
pub fn release_if_abandoned(fd: RawFd, local_port: u16, peer: SocketAddr) -> bool {
    let _searching = SEARCH.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: F_GETFD only asks whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return false;
    }
    // SAFETY: borrowed for the checks, never closed through it (ManuallyDrop).
    let socket = std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
    let state = tcp_state(&socket);
    let abandoned = socket.local_addr().is_ok_and(|a| a.port() == local_port)
        && match socket.peer_addr() {
            Ok(now) => now == peer && state.is_some_and(|state| state != TCP_ESTABLISHED),
            Err(_) => state == Some(TCP_CLOSE), // reset: no peer left to compare
        };
    if abandoned {
        // SAFETY: a descriptor of tiny_http's that its only user, a thread blocked for good,
        // never touches again; under `SEARCH`, so no search of ours holds the number.
        unsafe { libc::close(fd) };
    }
    abandoned
}

/// Linux's `TCP_ESTABLISHED` state: open both ways.
const TCP_ESTABLISHED: u8 = 1;

/// Linux's `TCP_CLOSE` state (after a reset).
const TCP_CLOSE: u8 = 7;

/// Linux's `TCP_CLOSE_WAIT` state: the peer closed its side, this one has not yet.
pub const TCP_CLOSE_WAIT: u8 = 8;

/// A connection's TCP state.
fn tcp_state(socket: &TcpStream) -> Option<u8> {
    tcp_info(socket).map(|info| info.tcpi_state)
}

/// What the kernel knows of a connection: its state and counts.
pub fn tcp_info(socket: &TcpStream) -> Option<libc::tcp_info> {
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
        (got == 0).then_some(info)
    }
}

/// Bytes a connection received that nobody has read from it yet: what waits in the kernel.
pub fn unread_bytes(socket: &TcpStream) -> u64 {
    queued(socket, libc::FIONREAD)
}

/// Bytes written to a connection that the peer has not acknowledged yet, sent or not.
pub fn unacknowledged_bytes(socket: &TcpStream) -> u64 {
    queued(socket, libc::TIOCOUTQ)
}

/// The byte count one of the socket's queues holds (`FIONREAD`: received, `TIOCOUTQ`, which
/// is `SIOCOUTQ`: to send); 0 when the kernel does not say.
fn queued(socket: &TcpStream, which: libc::Ioctl) -> u64 {
    let mut bytes: libc::c_int = 0;
    // SAFETY: both requests, on a descriptor we hold, write one int into `bytes`.
    let got = unsafe { libc::ioctl(socket.as_raw_fd(), which, &mut bytes) };
    if got == 0 { u64::try_from(bytes).unwrap_or(0) } else { 0 }
}

/// Shuts a connection down for reading: every read of it, blocked or to come, sees the end.
pub fn stop_reading(socket: &TcpStream) {
    // SAFETY: shutdown on a descriptor we hold; no memory involved.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RD) };
}

/// Shuts a connection down both ways (the peer sees the end at once).
pub fn shut(socket: &TcpStream) {
    // SAFETY: shutdown on a descriptor we hold; no memory involved.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_listed_from_a_number_up() {
        let files: Vec<std::fs::File> = (0..3).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let lowest = *fds.iter().min().unwrap();
        let listed = open_fds_from(lowest);
        assert!(fds.iter().all(|fd| listed.contains(fd)), "{fds:?} in {listed:?}");
        assert!(listed.iter().all(|fd| *fd >= lowest) && listed.windows(2).all(|w| w[0] < w[1]));
        assert!(open_fds_from(0).len() > listed.len(), "the ones below are listed from 0");
    }

    /// The listener's options reach every accepted connection: its timeouts, and no Nagle
    /// delay (which made every later response on a connection that took two writes wait
    /// 40 ms for a delayed ack).
    #[test]
    fn accepted_connections_have_the_listeners_options_from_their_first_byte() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.read_timeout().unwrap(), Some(CONNECTION_TIMEOUT));
        assert_eq!(accepted.write_timeout().unwrap(), Some(CONNECTION_TIMEOUT));
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY");
    }
}
