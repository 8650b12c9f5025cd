//! The `Deployments` service.

use std::pin::Pin;

use futures_util::Stream;
use tessera_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::deploy::spec::{DeploymentSpec, LoadedModel, check_name};
use crate::deploy::{DeployError, Deployments};

/// The one place where deployment errors become gRPC codes.
impl From<DeployError> for Status {
    fn from(e: DeployError) -> Status {
        let msg = e.to_string();
        match e {
            DeployError::NotFound(_) | DeployError::NoSuchRank { .. } => Status::not_found(msg),
            DeployError::AlreadyExists(_) | DeployError::NameBeingDeleted(_) => Status::already_exists(msg),
            DeployError::BeingDeleted(_) | DeployError::InvalidPlan(_) | DeployError::RollStopped(_) => {
                Status::failed_precondition(msg)
            }
            DeployError::Store { .. } | DeployError::NodeUnreachable { .. } | DeployError::ShuttingDown => {
                Status::unavailable(msg)
            }
        }
    }
}

/// max_surge / max_unavailable: 1/0 (the default, also when both are 0) or 0/1.
fn surge_of(max_surge: u32, max_unavailable: u32) -> Result<bool, Status> {
    match (max_surge, max_unavailable) {
        (0, 0) | (1, 0) => Ok(true),
        (0, 1) => Ok(false),
        (s, u) => Err(Status::invalid_argument(format!(
            "max_surge {s} / max_unavailable {u}: give max_surge 1 (start a new replica before stopping an old one; \
             the default) or max_surge 0 with max_unavailable 1 (stop one first, when no GPUs are spare)"
        ))),
    }
}

/// The call came with the reader token (a gateway), not the admin token.
fn is_reader<T>(r: &Request<T>) -> bool {
    r.extensions().get::<tessera_common::auth::Granted>() == Some(&tessera_common::auth::Granted::Reader)
}

/// What a reader may see of a deployment: everything but its env (secrets such as `HF_TOKEN`)
/// and its command.
fn for_caller(mut d: pb::Deployment, reader: bool) -> pb::Deployment {
    if reader {
        d.env.clear();
        d.command.clear();
    }
    d
}

pub struct DeploymentsService {
    pub deployments: Deployments,
    /// Log streams open at once.
    pub log_streams: super::streams::StreamLimits,
}

impl DeploymentsService {
    /// The model of `spec`: read on the head, or described by the node holding it (`--model-from`),
    /// what that node said kept in the spec for a restarted head.
    async fn load(&self, spec: &mut DeploymentSpec) -> Result<LoadedModel, Status> {
        if spec.model_from.is_empty() {
            let m = crate::server::planner::load_model_bounded(spec.model_path.clone()).await?;
            return Ok(LoadedModel::of(&m));
        }
        let d = self.deployments.describe(&spec.model_from, &spec.model_path).await?;
        let loaded = d.load(&spec.model_path).map_err(|e| {
            Status::failed_precondition(format!(
                "model_from: what {} said of {} is not a usable model: {e}",
                spec.model_from,
                spec.model_path.display()
            ))
        })?;
        spec.described = serde_json::to_string(&d).ok();
        Ok(loaded)
    }
}

/// Log streams a head serves at once, and from one peer address.
pub const MAX_LOG_STREAMS: usize = 256;
pub const MAX_LOG_STREAMS_PER_PEER: usize = 32;

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::deployments_server::Deployments for DeploymentsService {
    async fn create(&self, request: Request<pb::CreateDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        let mut spec = DeploymentSpec::from_request(request.get_ref())?;
        let replicas = crate::deploy::spec::replicas_from_wire(request.get_ref().replicas)?;
        let loaded = self.load(&mut spec).await?;
        let d = self.deployments.create(spec, loaded, replicas).await?;
        Ok(Response::new(d))
    }

    async fn get(&self, request: Request<pb::GetDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        let reader = is_reader(&request);
        let name = request.into_inner().name;
        check_name(&name)?;
        Ok(Response::new(for_caller(self.deployments.get(name).await?, reader)))
    }

    async fn list(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let reader = is_reader(&request);
        let deployments = self.deployments.list().await?.into_iter().map(|d| for_caller(d, reader)).collect();
        Ok(Response::new(pb::ListDeploymentsResponse { deployments }))
    }

    async fn delete(&self, request: Request<pb::DeleteDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        let name = request.into_inner().name;
        check_name(&name)?;
        Ok(Response::new(self.deployments.delete(name).await?))
    }

    async fn restart(
        &self,
        request: Request<pb::RestartDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let name = request.into_inner().name;
        check_name(&name)?;
        Ok(Response::new(self.deployments.restart(name).await?))
    }

    async fn scale(&self, request: Request<pb::ScaleDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        let req = request.into_inner();
        check_name(&req.name)?;
        if req.replicas == 0 || req.replicas > crate::deploy::spec::MAX_REPLICAS {
            return Err(Status::invalid_argument(format!(
                "replicas: {} is not 1 to {} (delete the deployment to stop it all)",
                req.replicas,
                crate::deploy::spec::MAX_REPLICAS
            )));
        }
        Ok(Response::new(self.deployments.scale(req.name, req.replicas).await?))
    }

    async fn update(&self, request: Request<pb::UpdateDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        let req = request.into_inner();
        let surge = surge_of(req.max_surge, req.max_unavailable)?;
        let Some(spec_req) = req.spec else {
            return Err(Status::invalid_argument("spec: give the new spec (the fields of Create)"));
        };
        let mut spec = DeploymentSpec::from_request(&spec_req)?;
        let loaded = self.load(&mut spec).await?;
        Ok(Response::new(self.deployments.update(spec, loaded, surge).await?))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let req = request.into_inner();
        check_name(&req.name)?;
        let surge = surge_of(req.max_surge, req.max_unavailable)?;
        let newest = self.deployments.newest_spec(req.name.clone()).await?;
        let Some(previous) = newest.previous else {
            return Err(Status::failed_precondition(format!(
                "{} has no earlier revision to go back to (it is at revision {})",
                req.name, newest.revision
            )));
        };
        let mut spec = *previous;
        spec.name = req.name;
        let loaded = self.load(&mut spec).await?;
        Ok(Response::new(self.deployments.update(spec, loaded, surge).await?))
    }

    type LogsStream = LogStream;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<LogStream>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        check_name(&req.name)?;
        let (tx, out) = super::streams::bounded::<pb::LogChunk, _>(64, &self.log_streams, peer, "log")?;
        let (id, mut rx) = self.deployments.logs(req).await?;
        let deployments = self.deployments.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    item = rx.recv() => match item {
                        Some(i) => {
                            let i = i.map(|data| pb::LogChunk { data }).map_err(Status::unavailable);
                            if !tx.send(i).await {
                                break;
                            }
                        }
                        None => return,
                    },
                    // The client went away: stop the worker following the file.
                    _ = tx.closed() => break,
                }
            }
            deployments.log_cancel(id).await;
        });
        Ok(Response::new(out))
    }
}
