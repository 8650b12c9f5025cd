//! The `Tokens` service: rotating the join token.

use std::path::PathBuf;

use tessera_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::auth::SharedTokens;
use crate::store::{BootstrapToken, Store};

/// The prefix of bootstrap join tokens.
pub const BOOTSTRAP_PREFIX: &str = "tsb";

/// Short-lived join tokens: hashes, expiry and uses left, kept in the store.
pub struct Bootstrap {
    tokens: std::sync::Mutex<std::collections::HashMap<String, BootstrapToken>>,
    store: std::sync::Arc<Store>,
}

fn hash_hex(token: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token).iter().map(|b| format!("{b:02x}")).collect()
}

impl Bootstrap {
    pub fn load(store: std::sync::Arc<Store>) -> Bootstrap {
        let tokens = store.bootstrap_tokens().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the bootstrap tokens; none are valid");
            Vec::new()
        });
        Bootstrap { tokens: std::sync::Mutex::new(tokens.into_iter().collect()), store }
    }

    /// Whether `token` is a live bootstrap token; one use is spent (and recorded) if so.
    pub fn admit(&self, token: &[u8], now_unix_ms: u64) -> bool {
        let h = hash_hex(token);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = tokens.get_mut(&h) else { return false };
        if t.expires_unix_ms <= now_unix_ms || t.uses_left == 0 {
            tokens.remove(&h);
            let _ = self.store.set_bootstrap(&h, None);
            return false;
        }
        t.uses_left -= 1;
        let record = t.clone();
        // A use that cannot be recorded is not given (it could be given again after a restart).
        if self.store.set_bootstrap(&h, Some(&record)).is_err() {
            t.uses_left += 1;
            return false;
        }
        true
    }

    fn create(&self, ttl_ms: u64, uses: u32, now_unix_ms: u64) -> Result<(String, BootstrapToken), String> {
        let token = tessera_common::auth::generate(BOOTSTRAP_PREFIX);
        let record = BootstrapToken { expires_unix_ms: now_unix_ms.saturating_add(ttl_ms), uses_left: uses };
        let h = hash_hex(token.as_bytes());
        self.store.set_bootstrap(&h, Some(&record)).map_err(|e| e.to_string())?;
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(h, record.clone());
        Ok((token, record))
    }
}

pub struct TokensService {
    /// `None` with `--insecure`.
    pub tokens: Option<SharedTokens>,
    pub bootstrap: std::sync::Arc<Bootstrap>,
    /// Where the join token lives (`--join-token-file`, else `DATA_DIR/join.token`).
    pub join_token_path: PathBuf,
    /// Heads on etcd share the tokens through the store: a rotation is written there too.
    pub store: std::sync::Arc<crate::store::Store>,
}

/// The tokens heads on one etcd store share (`PREFIX/tokens`), as JSON (protect etcd with TLS and
/// auth: these are the cluster's keys).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct EtcdTokens {
    pub join: String,
    pub admin: String,
    pub reader: String,
}

impl EtcdTokens {
    pub fn of(t: &tessera_common::auth::TokenSet) -> EtcdTokens {
        EtcdTokens { join: t.join.clone(), admin: t.admin.clone(), reader: t.reader.clone() }
    }

    pub fn into_set(self) -> tessera_common::auth::TokenSet {
        tessera_common::auth::TokenSet { join: self.join, admin: self.admin, reader: self.reader }
    }
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensService {
    async fn rotate_join_token(
        &self,
        _: Request<pb::RotateJoinTokenRequest>,
    ) -> Result<Response<pb::RotateJoinTokenResponse>, Status> {
        let Some(tokens) = &self.tokens else {
            return Err(Status::failed_precondition("authentication is off (--insecure): there is no join token"));
        };
        let fresh = tessera_common::auth::generate("tsj");
        // Heads on etcd: the shared copy first (the head that leads next reads it there).
        let mut next = EtcdTokens::of(&tokens.read().unwrap_or_else(|p| p.into_inner()));
        next.join = fresh.clone();
        let json = serde_json::to_vec(&next).map_err(|e| Status::internal(e.to_string()))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_shared("tokens", &json))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("cannot record the new join token: {e}; it is unchanged")))?;
        // The file first: a head restarted after this must not go back to the old token.
        tessera_common::auth::write_secret(&self.join_token_path, &fresh).map_err(|e| {
            Status::unavailable(format!(
                "cannot write {}: {e}; the join token is unchanged",
                self.join_token_path.display()
            ))
        })?;
        tokens.write().unwrap_or_else(|p| p.into_inner()).join = fresh.clone();
        warn!(path = %self.join_token_path.display(), "join token rotated: the old one no longer joins nodes");
        Ok(Response::new(pb::RotateJoinTokenResponse {
            join_token: fresh,
            written_to: self.join_token_path.display().to_string(),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let r = request.into_inner();
        if self.tokens.is_none() {
            return Err(Status::failed_precondition("authentication is off (--insecure): tokens mean nothing"));
        }
        if !(1..=30 * 24 * 3600).contains(&r.ttl_s) {
            return Err(Status::invalid_argument(format!("ttl_s: {} must be 1 s to 30 days", r.ttl_s)));
        }
        if !(1..=10_000).contains(&r.uses) {
            return Err(Status::invalid_argument(format!("uses: {} must be 1 to 10000", r.uses)));
        }
        let (token, record) = self
            .bootstrap
            .create(r.ttl_s * 1000, r.uses, crate::membership::unix_ms())
            .map_err(|e| Status::unavailable(format!("cannot record the token: {e}")))?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_unix_ms: record.expires_unix_ms,
            uses: record.uses_left,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_have_uses_and_an_expiry_that_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(Store::open(dir.path()).expect("store"));
        let b = Bootstrap::load(store.clone());
        let (token, _) = b.create(60_000, 2, 1_000).expect("create");
        assert!(b.admit(token.as_bytes(), 2_000), "first use");
        // A head restart in between: what was used stays used.
        let b = Bootstrap::load(store.clone());
        assert!(b.admit(token.as_bytes(), 3_000), "second use");
        assert!(!b.admit(token.as_bytes(), 4_000), "no uses left");
        let (short, _) = b.create(1_000, 5, 10_000).expect("create");
        assert!(!b.admit(short.as_bytes(), 11_000), "expired at its deadline");
        assert!(!b.admit(b"tsb_made_up_token_000000000000000", 10_000));
        assert!(store.bootstrap_tokens().expect("read").is_empty(), "spent and expired tokens are forgotten");
    }
}
