//! A ureq agent for remote runtimes: a resolver without per-request threads, and a
//! connector whose failures say that nothing was sent.
//!
//! ureq 3 resolves the host before every request, pooled connection or not, and whenever a
//! timeout is set its default resolver does that on a freshly spawned thread. On the hot path
//! that thread churn cost more than the request itself. This resolver answers IP-literal
//! hosts in place and remembers a name's addresses for [`NAME_TTL`]; only a name it has not
//! seen lately goes to ureq's default resolver (with its timeout).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{ConnectionDetails, Connector, DefaultConnector, NextTimeout, Transport};

/// How long a name's addresses are reused before they are looked up again.
pub const NAME_TTL: Duration = Duration::from_secs(10);

/// See the module documentation.
#[derive(Debug, Default)]
pub struct QuickResolver {
    names: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
    fallback: DefaultResolver,
}

impl Resolver for QuickResolver {
    fn resolve(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        if let Some(addr) = ip_literal(uri) {
            let mut addrs = self.empty();
            addrs.push(addr);
            return Ok(addrs);
        }
        let key = uri.authority().map(|a| a.as_str().to_ascii_lowercase()).unwrap_or_default();
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, addrs)) = names.get(&key).filter(|(at, _)| at.elapsed() < NAME_TTL) {
            return Ok(addrs.clone());
        }
        drop(names);
        // Whatever failed, nothing was sent: said as such, so no caller takes a failed lookup
        // for a request that may have been applied.
        let addrs = self.fallback.resolve(uri, config, timeout).map_err(|e| match e {
            ureq::Error::Timeout(t) => ureq::Error::Timeout(t),
            _ => ureq::Error::HostNotFound,
        })?;
        names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.retain(|_, (at, _)| at.elapsed() < NAME_TTL);
        names.insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

/// The address of a URI whose host is an IP literal (`127.0.0.1`, `[::1]`) with a port.
fn ip_literal(uri: &Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().ok()?;
    let port = authority.port_u16().or_else(|| match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    })?;
    Some(SocketAddr::new(ip, port))
}

/// An agent with `config` that resolves through [`QuickResolver`] and connects through
/// [`Connecting`].
pub fn agent(config: Config) -> ureq::Agent {
    ureq::Agent::with_parts(config, Connecting::default(), QuickResolver::default())
}

/// ureq's own connector (TCP, then TLS for `https`), its failures told as what they are:
/// nothing of the request was sent. ureq reports a connection reset in the TLS handshake
/// as it does one after the request left (an I/O error), and a create or input that failed
/// so would be said to have maybe been applied; from here a TLS error is ureq's own TLS
/// error (its reason kept) and any other a failed connection.
#[derive(Debug, Default)]
pub struct Connecting(DefaultConnector);

impl Connector for Connecting {
    type Out = Box<dyn Transport>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<()>) -> Result<Option<Self::Out>, ureq::Error> {
        self.0.connect(details, chained).map_err(|error| match error {
            // A refused connection says so already; so does a gateway out of descriptors.
            ureq::Error::Io(io)
                if io.kind() == std::io::ErrorKind::ConnectionRefused
                    || crate::http::sockets::out_of_descriptors(&io) =>
            {
                ureq::Error::Io(io)
            }
            ureq::Error::Io(io)
                if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) =>
            {
                ureq::Error::Timeout(ureq::Timeout::Connect)
            }
            ureq::Error::Io(io) => match io.into_inner().map(|inner| inner.downcast::<rustls::Error>()) {
                Some(Ok(tls)) => ureq::Error::Rustls(*tls),
                _ => ureq::Error::ConnectionFailed,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(url: &str) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let uri: Uri = url.parse().expect("a test URL");
        QuickResolver::default().resolve(&uri, &Config::default(), NextTimeout::default())
    }

    #[test]
    fn ip_literals_resolve_in_place() {
        assert_eq!(resolve("http://127.0.0.1:8788/v1").unwrap()[..], ["127.0.0.1:8788".parse().unwrap()]);
        assert_eq!(resolve("http://[::1]/v1").unwrap()[..], ["[::1]:80".parse().unwrap()]);
        assert_eq!(resolve("https://10.0.0.1/").unwrap()[..], ["10.0.0.1:443".parse().unwrap()]);
    }

    #[test]
    fn names_resolve_and_are_remembered() {
        let resolver = QuickResolver::default();
        let uri: Uri = "http://localhost:9/x".parse().unwrap();
        let first = resolver.resolve(&uri, &Config::default(), NextTimeout::default()).unwrap();
        assert!(first.iter().all(|a| a.port() == 9 && a.ip().is_loopback()));
        assert_eq!(resolver.names.lock().unwrap().len(), 1);
        assert_eq!(resolver.resolve(&uri, &Config::default(), NextTimeout::default()).unwrap()[..], first[..]);
    }

    #[test]
    fn unknown_names_are_errors_and_not_remembered() {
        let resolver = QuickResolver::default();
        let uri: Uri = "http://no-such-host.invalid:1/".parse().unwrap();
        assert!(resolver.resolve(&uri, &Config::default(), NextTimeout::default()).is_err());
        assert!(resolver.names.lock().unwrap().is_empty());
    }
}
