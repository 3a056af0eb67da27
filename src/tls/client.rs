//! What a remote runtime's certificate must chain to, for REST (ureq) and events
//! (tungstenite) alike, and the TLS stream of an event connection.
//!
//! Failures are described by kind only ([`reason`]): rustls's own texts can name the host
//! a certificate was checked against, and a remote's address is backend-private.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// What a remote runtime's certificate must chain to.
#[derive(Clone, Default)]
pub enum Trust {
    /// The operating system's trust store (read once per process).
    #[default]
    System,
    /// Only the certificates of a `ca_file`: a private CA, or a self-signed runtime's own
    /// certificate (which pins that runtime).
    Only(Arc<Vec<CertificateDer<'static>>>),
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::System => f.write_str("system trust store"),
            Trust::Only(certs) => write!(f, "ca_file ({} certificates)", certs.len()),
        }
    }
}

impl Trust {
    /// Trusts only the certificates in the PEM file at `path`; each must be usable as a
    /// trust anchor. Errors name the file.
    pub fn ca_file(path: &Path) -> anyhow::Result<Trust> {
        let certs = super::read_certificates(path, "runtimes.ca_file")?;
        for (index, cert) in certs.iter().enumerate() {
            RootCertStore::empty().add(cert.clone()).map_err(|_| {
                anyhow::anyhow!(
                    "runtimes.ca_file: certificate {} in {} is not a usable CA certificate",
                    index + 1,
                    path.display()
                )
            })?;
        }
        Ok(Trust::Only(Arc::new(certs)))
    }

    fn certificates(&self) -> Arc<Vec<CertificateDer<'static>>> {
        match self {
            Trust::System => system_roots(),
            Trust::Only(certs) => certs.clone(),
        }
    }
}

/// The operating system's CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR` override where
/// they are read from), read on first use.
fn system_roots() -> Arc<Vec<CertificateDer<'static>>> {
    static ROOTS: OnceLock<Arc<Vec<CertificateDer<'static>>>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                log::debug!("system trust store: {error}");
            }
            if found.certs.is_empty() {
                log::warn!(
                    "the system trust store has no CA certificates: https runtimes without ca_file will fail TLS \
                     (install ca-certificates, or set ca_file)"
                );
            }
            Arc::new(found.certs)
        })
        .clone()
}

/// The TLS settings of a runtime at `base_url`: `None` for `http://`; for `https://`, trusting
/// `ca_file` (already resolved) or else the system trust store. A `ca_file` on an `http://`
/// runtime is a mistake worth stopping for.
pub fn for_base_url(base_url: &str, ca_file: Option<&Path>) -> anyhow::Result<Option<ClientTls>> {
    match (base_url.starts_with("https://"), ca_file) {
        (false, None) => Ok(None),
        (false, Some(_)) => anyhow::bail!("runtimes.ca_file needs an https:// base_url"),
        (true, None) => Ok(Some(ClientTls::new(Trust::System))),
        (true, Some(path)) => Ok(Some(ClientTls::new(Trust::ca_file(path)?))),
    }
}

/// The TLS settings of one remote runtime: the same roots for its REST calls and its event
/// streams.
#[derive(Clone)]
pub struct ClientTls {
    trust: Trust,
    config: Arc<ClientConfig>,
    roots: Arc<Vec<CertificateDer<'static>>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("trust", &self.trust).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Settings trusting `trust`.
    pub fn new(trust: Trust) -> ClientTls {
        let roots = trust.certificates();
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(roots.iter().cloned());
        let config = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .expect("ring implements every TLS version rustls has")
            .with_root_certificates(store)
            .with_no_client_auth();
        ClientTls { trust, config: Arc::new(config), roots }
    }

    /// The same trust for a ureq agent.
    pub fn ureq(&self) -> ureq::tls::TlsConfig {
        let roots = self.roots.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned());
        ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::from(roots))
            .unversioned_rustls_crypto_provider(super::provider())
            .build()
    }

    /// Runs the TLS handshake with `host` (a name or an IP literal, without brackets or
    /// port) over `tcp`, within its deadline (however slowly the runtime answers).
    pub fn connect(&self, host: &str, mut tcp: TimedTcp) -> Result<ClientStream, HandshakeError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| HandshakeError::Tls(INVALID_NAME))?;
        let mut conn = ClientConnection::new(self.config.clone(), name).map_err(|e| HandshakeError::Tls(reason(&e)))?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok((0, 0)) => return Err(HandshakeError::Tls(CLOSED)),
                Ok(_) => {}
                Err(e) => return Err(io_reason(&e).map_or(HandshakeError::Io(e), HandshakeError::Tls)),
            }
        }
        Ok(ClientStream::Tls(Box::new(StreamOwned::new(conn, tcp))))
    }
}

const INVALID_NAME: &str = "TLS: the runtime's host is not a valid TLS server name";
const CLOSED: &str = "TLS: the runtime closed the connection during the handshake";

/// Why a TLS handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// A TLS failure, described by [`reason`].
    Tls(&'static str),
    /// The connection failed (a timeout, a reset).
    Io(io::Error),
}

/// What went wrong with a runtime's TLS, in words that name TLS and never a host.
pub fn reason(error: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            "TLS: the runtime's certificate is not valid for the host name in base_url"
        }
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "TLS: the runtime's certificate has expired"
        }
        E::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            "TLS: the runtime's certificate is not valid yet"
        }
        E::InvalidCertificate(CertificateError::Revoked) => "TLS: the runtime's certificate was revoked",
        // An unknown issuer surfaces as whichever check of the candidate chains failed last.
        E::InvalidCertificate(_) => {
            "TLS: the runtime's certificate is not signed by a CA this gateway trusts (see ca_file)"
        }
        E::AlertReceived(_) => "TLS: the runtime refused the handshake",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "TLS: the runtime did not answer with TLS (is it serving plain http?)"
        }
        E::PeerIncompatible(_) => "TLS: the runtime has no protocol version or cipher suite in common with the gateway",
        _ => "TLS: the handshake with the runtime failed",
    }
}

/// [`reason`] for the rustls error inside an I/O error (rustls reports through `io::Error`).
pub fn io_reason(error: &io::Error) -> Option<&'static str> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(reason)
}

/// A TCP connection whose reads can be given a deadline. The socket timeout bounds one
/// read only: a peer sending a byte at a time would keep a TLS handshake, an upgrade or a
/// frame going for ever, since rustls and tungstenite read on until they have a whole
/// record or frame. Past the deadline a read fails as `WouldBlock` (what was read stays
/// with them for the next call); before it, each read waits at most until it.
pub struct TimedTcp {
    tcp: TcpStream,
    deadline: Option<Instant>,
    /// Bytes arrived since [`ClientStream::take_received`] last asked.
    received: bool,
}

impl TimedTcp {
    /// `tcp`, its reads bounded by `deadline`.
    pub fn new(tcp: TcpStream, deadline: Option<Instant>) -> TimedTcp {
        TimedTcp { tcp, deadline, received: false }
    }
}

impl Read for TimedTcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        let n = self.tcp.read(buf)?;
        self.received |= n > 0;
        Ok(n)
    }
}

impl Write for TimedTcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A client connection, with or without TLS.
pub enum ClientStream {
    /// `ws://`.
    Plain(TimedTcp),
    /// `wss://`.
    Tls(Box<StreamOwned<ClientConnection, TimedTcp>>),
}

impl ClientStream {
    fn timed(&self) -> &TimedTcp {
        match self {
            ClientStream::Plain(tcp) => tcp,
            ClientStream::Tls(tls) => tls.get_ref(),
        }
    }

    fn timed_mut(&mut self) -> &mut TimedTcp {
        match self {
            ClientStream::Plain(tcp) => tcp,
            ClientStream::Tls(tls) => tls.get_mut(),
        }
    }

    /// The TCP socket underneath (for timeouts and the blocking mode).
    pub fn tcp(&self) -> &TcpStream {
        &self.timed().tcp
    }

    /// Bounds the reads from now on by `deadline` (see [`TimedTcp`]); `None` lifts it.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.timed_mut().deadline = deadline;
    }

    /// What bounds the reads now (see [`ClientStream::set_deadline`]).
    pub fn deadline(&self) -> Option<Instant> {
        self.timed().deadline
    }

    /// Whether any bytes arrived since the last call: a peer sending a large frame slowly
    /// is alive, though no whole message came yet.
    pub fn take_received(&mut self) -> bool {
        std::mem::take(&mut self.timed_mut().received)
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(tcp) => tcp.read(buf),
            ClientStream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(tcp) => tcp.write(buf),
            ClientStream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(tcp) => tcp.flush(),
            ClientStream::Tls(tls) => tls.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_tls_and_never_the_host() {
        let name = ServerName::try_from("secret-host.example").unwrap();
        let errors = [
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected: name,
                presented: vec!["DnsName(\"other-host.example\")".into()],
            }),
            rustls::Error::General("secret-host.example:8443".into()),
        ];
        for error in &errors {
            let text = reason(error);
            assert!(text.starts_with("TLS: ") && !text.contains("host.example"), "{text}");
        }
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, errors[0].clone());
        assert_eq!(io_reason(&wrapped), Some(reason(&errors[0])));
        assert_eq!(io_reason(&io::Error::other("plain")), None);
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("wg-ca-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = Trust::ca_file(&empty).unwrap_err().to_string();
        assert!(error.contains("empty.pem") && error.contains("no PEM certificate"), "{error}");
        let missing = Trust::ca_file(&dir.join("missing.pem")).unwrap_err().to_string();
        assert!(missing.contains("missing.pem"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
