//! The `Tokens` service: rotating the join token.

use std::path::PathBuf;

use tessera_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::auth::SharedTokens;

pub struct TokensService {
    /// `None` with `--insecure`.
    pub tokens: Option<SharedTokens>,
    /// Where the join token lives (`--join-token-file`, else `DATA_DIR/join.token`).
    pub join_token_path: PathBuf,
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
}
