//! TLS on every leg, with rustls and ring: what the gateway trusts when it calls a remote
//! runtime over `https://` and `wss://` ([`client`]), and the certificate `serve` and
//! `runtime` present when they terminate TLS themselves ([`front`]).
//!
//! ring is the only crypto provider in the build (aws-lc-rs needs a C/cmake toolchain), and
//! every configuration names it explicitly: nothing depends on a process-wide default.

pub mod client;
pub mod front;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider of every TLS configuration this program builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in the file at `path`; `what` names the setting in errors, which
/// also name the file.
pub fn read_certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{what}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{what}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display());
    }
    Ok(certs)
}

/// The PEM private key (PKCS#8, PKCS#1 or SEC1) in the file at `path`; errors name
/// `what` and the file, never the key.
pub fn read_private_key(path: &Path, what: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_pem(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| anyhow::anyhow!("{what}: {} holds no PEM private key", path.display()))
}

/// A PEM file's bytes: a regular file of at most 1 MiB (a CA bundle is a few hundred KiB).
fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    crate::files::read_small_file(path, 1 << 20).with_context(|| format!("{what}: cannot read {}", path.display()))
}
