//! TLS settings (rustls through tonic) from PEM files, for the head, workers and the CLI.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

/// Head side: serve with `cert`+`key`; with `client_ca`, require client certificates it signed.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTlsConfig, String> {
    let mut cfg = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert, "certificate (--tls-cert)")?, read(key, "key (--tls-key)")?));
    if let Some(ca) = client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca, "client CA (--tls-client-ca)")?));
    }
    Ok(cfg)
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
