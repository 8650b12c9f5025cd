//! Bearer tokens: a join token (workers: the membership session) and an admin token (everything
//! else). Generation, storage (0600 files in the head's data dir), constant-time checks, and the
//! client-side interceptor that sends one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tessera.v1.Membership`: workers joining and holding their session.
    Join,
    /// Everything else: plan, deploy, delete, drain, logs, events.
    Admin,
    /// Reading deployments (`Deployments/List` and `Get`, their env and command left out): the
    /// reader token (`reader.token`), made for gateways, or the admin token.
    Read,
    /// The standard health check and server reflection: no token (load balancers, grpcurl).
    Public,
}

impl Role {
    /// The role a gRPC method path (`/tessera.v1.Membership/Session`) needs.
    pub fn for_path(path: &str) -> Role {
        if path.starts_with("/tessera.v1.Membership/") {
            Role::Join
        } else if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
            Role::Public
        } else if path == "/tessera.v1.Deployments/List" || path == "/tessera.v1.Deployments/Get" {
            Role::Read
        } else {
            Role::Admin
        }
    }
}

/// The head's tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSet {
    pub join: String,
    pub admin: String,
    /// Reads deployments and nothing else (for gateways).
    pub reader: String,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSet { join: <secret>, admin: <secret>, reader: <secret> }")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No bearer token, or one the head does not know: gRPC `UNAUTHENTICATED`.
    Unauthenticated { missing: bool },
    /// A valid token of the wrong role (the join token on an admin call): `PERMISSION_DENIED`.
    WrongRole,
}

/// The token of an `authorization` header value: `Bearer TOKEN`, the scheme case-insensitive
/// (RFC 6750); `None` for another scheme or an empty token.
pub fn bearer_token(h: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = h.split_at(h.iter().position(|&b| b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii_start()).filter(|t| !t.is_empty())
}

/// What let a request in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    Public,
    Admin,
    /// The reader token, on a `Role::Read` call.
    Reader,
    Join,
    /// A node's own credential (`tsn_...`) on a membership session: the join itself checks that
    /// it belongs to the node id the session claims.
    NodeCredential(String),
}

/// The prefix of node credentials (see `generate`).
pub const NODE_CREDENTIAL_PREFIX: &str = "tsn_";

impl TokenSet {
    /// Checks the `authorization` header value for a call that needs `role`.
    pub fn check(&self, role: Role, authorization: Option<&[u8]>) -> Result<Granted, Denied> {
        if role == Role::Public {
            return Ok(Granted::Public);
        }
        let Some(token) = authorization.and_then(bearer_token) else {
            return Err(Denied::Unauthenticated { missing: true });
        };
        let admin = constant_time_eq(token, self.admin.as_bytes());
        let join = constant_time_eq(token, self.join.as_bytes());
        let reader = constant_time_eq(token, self.reader.as_bytes());
        match (role, admin, join) {
            (_, true, _) => Ok(Granted::Admin),
            (Role::Join, false, true) => Ok(Granted::Join),
            (Role::Admin | Role::Read, false, true) => Err(Denied::WrongRole),
            (Role::Read, false, false) if reader => Ok(Granted::Reader),
            (Role::Admin | Role::Join, false, false) if reader => Err(Denied::WrongRole),
            (Role::Join, false, false) if token.starts_with(NODE_CREDENTIAL_PREFIX.as_bytes()) => {
                let t = std::str::from_utf8(token).map_err(|_| Denied::Unauthenticated { missing: false })?;
                check_token_syntax(t).map_err(|_| Denied::Unauthenticated { missing: false })?;
                Ok(Granted::NodeCredential(t.to_string()))
            }
            _ => Err(Denied::Unauthenticated { missing: false }),
        }
    }

    /// Loads `join.token` and `admin.token` from `dir`, creating (0600) whichever is missing.
    /// Returns the set and whether anything was created.
    pub fn load_or_create(dir: &Path) -> std::io::Result<(TokenSet, bool)> {
        std::fs::create_dir_all(dir)?;
        let mut created = false;
        let mut get = |name: &str, prefix: &str| -> std::io::Result<String> {
            let p = dir.join(name);
            match read_token_file(&p) {
                Ok(t) => Ok(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let t = generate(prefix);
                    write_secret(&p, &t)?;
                    created = true;
                    Ok(t)
                }
                Err(e) => Err(e),
            }
        };
        let join = get("join.token", "tsj")?;
        let admin = get("admin.token", "tsa")?;
        let reader = get("reader.token", "tsr")?;
        Ok((TokenSet { join, admin, reader }, created))
    }

    pub fn join_path(dir: &Path) -> PathBuf {
        dir.join("join.token")
    }

    pub fn admin_path(dir: &Path) -> PathBuf {
        dir.join("admin.token")
    }

    pub fn reader_path(dir: &Path) -> PathBuf {
        dir.join("reader.token")
    }
}

/// A new random token: a prefix naming its role and 256 random bits in hex.
pub fn generate(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// Reads a token file: its first line, trimmed; an empty file is an error.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    let s = std::fs::read_to_string(path)?;
    let t = s.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is empty", path.display())));
    }
    check_token_syntax(&t)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
    if let Some(w) = crate::files::shared_secret_warning(path) {
        tracing::warn!("{w}");
    }
    Ok(t)
}

/// Tokens travel in an HTTP header: visible ASCII only, at least 16 characters.
pub fn check_token_syntax(t: &str) -> Result<(), String> {
    if t.len() < 16 || t.len() > 512 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token must be 16-512 visible ASCII characters".into());
    }
    Ok(())
}

/// Writes a secret file atomically, mode 0600.
pub fn write_secret(path: &Path, value: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{value}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Adds `authorization: Bearer <token>` to every call (nothing when there is no token).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        match token {
            None => Ok(Bearer(None)),
            Some(t) => {
                check_token_syntax(t)?;
                let v = format!("Bearer {t}").parse().map_err(|_| "a token must be visible ASCII".to_string())?;
                Ok(Bearer(Some(v)))
            }
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_tokens() {
        let t = TokenSet { join: generate("tsj"), admin: generate("tsa"), reader: generate("tsr") };
        let h = |s: &str| format!("Bearer {s}").into_bytes();
        assert_eq!(t.check(Role::Admin, Some(&h(&t.admin))), Ok(Granted::Admin));
        assert_eq!(t.check(Role::Join, Some(&h(&t.admin))), Ok(Granted::Admin), "admin may do everything");
        assert_eq!(t.check(Role::Join, Some(&h(&t.join))), Ok(Granted::Join));
        let node = generate("tsn");
        assert_eq!(t.check(Role::Join, Some(&h(&node))), Ok(Granted::NodeCredential(node.clone())));
        assert_eq!(t.check(Role::Admin, Some(&h(&node))), Err(Denied::Unauthenticated { missing: false }));
        assert_eq!(t.check(Role::Admin, Some(&h(&t.join))), Err(Denied::WrongRole), "a worker token cannot deploy");
        assert_eq!(t.check(Role::Admin, None), Err(Denied::Unauthenticated { missing: true }));
        assert_eq!(t.check(Role::Admin, Some(b"Basic abc")), Err(Denied::Unauthenticated { missing: true }));
        let lower = format!("bearer {}", t.admin).into_bytes();
        assert_eq!(t.check(Role::Admin, Some(&lower)), Ok(Granted::Admin), "the scheme is case-insensitive");
        assert_eq!(t.check(Role::Admin, Some(b"Bearer ")), Err(Denied::Unauthenticated { missing: true }));
        assert_eq!(
            t.check(Role::Join, Some(&h("tsa_wrong0000000000000"))),
            Err(Denied::Unauthenticated { missing: false })
        );
        assert_eq!(Role::for_path("/tessera.v1.Membership/Session"), Role::Join);
        assert_eq!(Role::for_path("/tessera.v1.Deployments/Create"), Role::Admin);
        assert_eq!(Role::for_path("/grpc.health.v1.Health/Check"), Role::Public);
        assert_eq!(t.check(Role::Public, None), Ok(Granted::Public), "health checks need no token");
        // The reader token reads deployments and does nothing else; the admin token reads too.
        assert_eq!(Role::for_path("/tessera.v1.Deployments/List"), Role::Read);
        assert_eq!(Role::for_path("/tessera.v1.Deployments/Get"), Role::Read);
        assert_eq!(Role::for_path("/tessera.v1.Deployments/Logs"), Role::Admin);
        assert_eq!(t.check(Role::Read, Some(&h(&t.reader))), Ok(Granted::Reader));
        assert_eq!(t.check(Role::Read, Some(&h(&t.admin))), Ok(Granted::Admin));
        assert_eq!(t.check(Role::Read, Some(&h(&t.join))), Err(Denied::WrongRole));
        assert_eq!(t.check(Role::Admin, Some(&h(&t.reader))), Err(Denied::WrongRole));
        assert_eq!(t.check(Role::Join, Some(&h(&t.reader))), Err(Denied::WrongRole));
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
    }

    #[test]
    fn tokens_are_created_once_with_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, created) = TokenSet::load_or_create(dir.path()).expect("create");
        assert!(created);
        assert_ne!(a.join, a.admin);
        let mode = std::fs::metadata(TokenSet::admin_path(dir.path())).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = TokenSet::load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(a, b);
        std::fs::write(TokenSet::join_path(dir.path()), "\n").expect("write");
        assert!(TokenSet::load_or_create(dir.path()).is_err(), "an empty token file is an error, not a new token");
    }
}
