//! What browsers send on a page's behalf, checked by both servers: the `Host` a page's
//! request names (a page whose name was rebound to this machine's address names its own
//! host), and whether a request comes from a web page at all (`Origin`, `Sec-Fetch-Site`).

use std::net::{IpAddr, SocketAddr};

use super::{ApiError, Incoming};

/// Which `Host` header values are accepted (DNS-rebinding protection).
pub struct HostPolicy {
    bind: SocketAddr,
    extra: Vec<String>,
    tls: bool,
}

impl HostPolicy {
    /// Loopback, `localhost`, the bind address and `extra` names are accepted.
    pub fn new(bind: SocketAddr, extra: Vec<String>) -> HostPolicy {
        HostPolicy { bind, extra: extra.into_iter().map(|h| h.to_ascii_lowercase()).collect(), tls: false }
    }

    /// The same policy for a server that terminates TLS itself (`tls`).
    pub fn serving_tls(self, tls: bool) -> HostPolicy {
        HostPolicy { tls, ..self }
    }

    /// Whether an `Origin` of scheme `scheme` on `request` is how browsers reach this server:
    /// `https` when it terminates TLS itself, or when a proxy in front says its client used
    /// https (`X-Forwarded-Proto`, any of its values; a page cannot set it on another site's
    /// request, and a second such header, which would go unread, counts as saying it); else
    /// `http` or `https`, as a proxy behind a TLS one says `http` of a browser that used https.
    pub fn own_scheme(&self, request: &Incoming, scheme: &str) -> bool {
        let forwarded_https = request.header_repeated("x-forwarded-proto")
            || request
                .header("x-forwarded-proto")
                .is_some_and(|value| value.split(',').any(|proto| proto.trim().eq_ignore_ascii_case("https")));
        match self.tls || forwarded_https {
            true => scheme.eq_ignore_ascii_case("https"),
            false => scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"),
        }
    }

    /// 403 `forbidden_host` unless `request`'s `Host` is acceptable (and single: a second
    /// one would pass unread).
    pub fn check(&self, request: &Incoming) -> Result<(), ApiError> {
        if self.allows(request.header("host")) && !request.header_repeated("host") {
            Ok(())
        } else {
            Err(ApiError::new(403, "forbidden_host", "this Host is not served here (DNS rebinding protection)"))
        }
    }

    /// True when `host` (a `Host` header, port optional) is acceptable; absent is accepted.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let name = strip_port(host.trim()).to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") || self.extra.contains(&name) {
            return true;
        }
        match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.bind.ip() || self.bind.ip().is_unspecified(),
            Err(_) => false,
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(ip, _)| &host[..ip.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `request`'s `Origin` is one of `allowed` (compared without regard to ASCII case).
pub fn allowed_origin(request: &Incoming, allowed: &[String]) -> bool {
    request.header("origin").is_some_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)))
}

/// Whether a browser sent `request` for a web page: it carries an `Origin`, or a
/// `Sec-Fetch-Site` other than `none` (which is an address the person typed). Other clients
/// (curl, scripts, the gateway) send neither.
pub fn from_a_page(request: &Incoming) -> bool {
    request.header("origin").is_some()
        || request.header("sec-fetch-site").is_some_and(|site| !site.trim().eq_ignore_ascii_case("none"))
        || request.header_repeated("sec-fetch-site")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_policy() {
        let p = HostPolicy::new("127.0.0.1:8787".parse().unwrap(), vec!["gw.example".into()]);
        for ok in [
            None,
            Some("127.0.0.1:8787"),
            Some("localhost"),
            Some("LOCALHOST:1"),
            Some("[::1]:8787"),
            Some("gw.example"),
            Some("app.localhost"),
        ] {
            assert!(p.allows(ok), "{ok:?}");
        }
        for bad in [Some("evil.example"), Some("10.0.0.1:8787"), Some("127.0.0.1.evil.example")] {
            assert!(!p.allows(bad), "{bad:?}");
        }
        let any = HostPolicy::new("0.0.0.0:8787".parse().unwrap(), vec![]);
        assert!(any.allows(Some("192.168.1.5:8787")));
        assert!(!any.allows(Some("rebind.example")));
    }
}
