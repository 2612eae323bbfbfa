//! TLS of the gRPC port and of the slave's link, through tonic's rustls
//! support (ring provider).
//!
//! - **Server** (`server.tls_cert`, `server.tls_key`): the port speaks TLS
//!   only; a plaintext client fails its HTTP/2 handshake. With
//!   `server.tls_client_ca` every client must present a certificate signed by
//!   that CA (mutual TLS), health and reflection included. Handshakes run
//!   beside the accept loop, each bounded by [`HANDSHAKE_TIMEOUT`], on the
//!   connections of [`super::connections`] (which keep their slot, idle and
//!   shutdown handling, and `Request::remote_addr`).
//! - **Slave** (`https://` in `slave.master`): the master's certificate is
//!   checked against `slave.tls_ca`, or against the system's trust store when
//!   `slave.tls_ca` is unset; `slave.tls_cert` + `slave.tls_key` are presented
//!   to a master that asks for a client certificate.
//!
//! Files are read and checked when the configuration is loaded (missing
//! file, no PEM certificate or key in it, key not matching the certificate),
//! and read again when the server starts or the link connects.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::{ConfigError, ServerConfig, SlaveConfig};

/// A TLS handshake (server or client side) not finished within this fails.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(m: String) -> ConfigError {
    ConfigError::Invalid(m)
}

/// An error and its sources, `: `-separated (tonic's transport errors say
/// little without their sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_sources(e.to_string(), e.source())
}

/// `head` followed by `source` and its own sources, each one that `head` (or
/// an earlier source) does not already say.
pub fn with_sources(
    mut head: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(s) = source {
        let text = s.to_string();
        if !head.contains(&text) {
            head.push_str(": ");
            head.push_str(&text);
        }
        source = s.source();
    }
    head
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(format!("{key} {}: {e}", path.display())))
}

/// The PEM file of `key`: at least one certificate, all of them parseable.
fn read_certs(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{key} {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{key} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        )));
    }
    Ok(pem)
}

/// The PEM file of `key`: one private key (PKCS#8, PKCS#1 or SEC1).
fn read_key(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(format!(
            "{key} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}",
            path.display()
        ))
    })?;
    Ok(pem)
}

/// The TLS configuration of the gRPC port, `None` when `server.tls_cert` is
/// unset. Checks that the key matches the certificate.
pub fn server_tls(c: &ServerConfig) -> Result<Option<ServerTlsConfig>, ConfigError> {
    let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(
        read_certs("server.tls_cert", cert)?,
        read_key("server.tls_key", key)?,
    );
    let mut tls = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &c.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_certs(
            "server.tls_client_ca",
            ca,
        )?));
    }
    // Builds the rustls configuration once, as the server will.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| {
            invalid(format!(
                "server.tls_cert {} / server.tls_key {}: {}",
                cert.display(),
                key.display(),
                error_chain(&e)
            ))
        })?;
    Ok(Some(tls))
}

/// The endpoint of `slave.master`, with TLS when it is an `https://` URL.
/// Timeouts and other connection settings are the caller's.
pub fn master_endpoint(s: &SlaveConfig) -> Result<Endpoint, ConfigError> {
    let endpoint = Endpoint::from_shared(s.master.clone())
        .map_err(|e| invalid(format!("slave.master {:?}: {e}", s.master)))?;
    if !s.master.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
    tls = match &s.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read_certs("slave.tls_ca", ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read_certs("slave.tls_cert", cert)?,
            read_key("slave.tls_key", key)?,
        ));
    }
    endpoint.tls_config(tls).map_err(|e| {
        let what = match &s.tls_ca {
            Some(ca) => format!("slave.tls_ca {}", ca.display()),
            None => "the system's trust store (slave.tls_ca is unset)".into(),
        };
        invalid(format!(
            "TLS to slave.master {:?} with {what}, slave.tls_cert {:?}: {}",
            s.master,
            s.tls_cert,
            error_chain(&e)
        ))
    })
}
