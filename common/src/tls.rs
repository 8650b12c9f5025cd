//! TLS settings (rustls) from PEM files, for the head, workers and the CLI.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// Client side: trust `ca`, and present `cert`+`key` when the head asks for client certificates.
/// `None` when no TLS file is given (plain http).
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    domain: Option<&str>,
) -> Result<Option<ClientTlsConfig>, String> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let mut cfg = ClientTlsConfig::new();
    match ca {
        Some(ca) => cfg = cfg.ca_certificate(Certificate::from_pem(read(ca, "CA certificate (--tls-ca)")?)),
        None => return Err("TLS needs --tls-ca: the CA certificate that signed the head's certificate".into()),
    }
    match (cert, key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(Identity::from_pem(
                read(c, "client certificate (--tls-cert)")?,
                read(k, "client key (--tls-key)")?,
            ))
        }
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together (a client certificate and its key)".into()),
    }
    if let Some(d) = domain {
        cfg = cfg.domain_name(d);
    }
    Ok(Some(cfg))
}

/// Head side: serve with `cert`+`key` (HTTP/2 only, by ALPN); with `client_ca`, require client
/// certificates it signed. A rustls configuration, because the head runs its own HTTP/2 server
/// (see `tessera_head::server::serve`).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(cert, "certificate (--tls-cert)")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain ({e})", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\")", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key, "key (--tls-key)")?)
        .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca, "client CA (--tls-client-ca)")?) {
                let c = c.map_err(|e| format!("{}: not a PEM certificate ({e})", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{} and {} do not make a TLS identity: {e}", cert.display(), key.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// An http(s) URL must match whether TLS is configured.
pub fn check_scheme(url: &str, tls: bool) -> Result<(), String> {
    match (url.starts_with("https://"), tls) {
        (true, false) => Err(format!("{url} is https: give --tls-ca (the CA that signed the head's certificate)")),
        (false, true) if url.starts_with("http://") => {
            Err(format!("TLS files were given but {url} is plain http: use https://"))
        }
        _ => Ok(()),
    }
}
