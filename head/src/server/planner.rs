//! The `Planner` service: plans against the live inventory. Reserves nothing.

use tessera_common::model::{self, load::ModelError};
use tessera_common::plan::memory::Weights;
use tessera_common::plan::{self, DEFAULT_GPU_MEMORY_UTILIZATION, PlanRequest, Size};
use tessera_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::deploy::inventory::cluster_of;
use crate::deploy::spec::model_path;
use crate::membership::Membership;

pub struct PlannerService {
    pub membership: Membership,
}

/// Upper bound on TP, PP and partition entries accepted over the API.
const MAX_SIZE: u32 = 4096;

#[tonic::async_trait]
impl pb::planner_server::Planner for PlannerService {
    async fn plan(&self, request: Request<pb::PlanRequest>) -> Result<Response<pb::PlanReport>, Status> {
        let r = request.into_inner();
        let req = plan_request(&r)?;
        let path = model_path(&r.model_path)?;
        let model = load_model_bounded(path).await?;
        let cluster = cluster_of(&self.membership.list().await);
        let report = tokio::task::spawn_blocking(move || {
            let weights = model.weights.as_ref().map(Weights::exact).unwrap_or_else(|| Weights::estimate(&model.desc));
            plan::plan(&model.desc, &weights, &cluster, &req)
        })
        .await
        .map_err(|e| Status::internal(format!("planning task failed: {e}")))?;
        Ok(Response::new(pb::PlanReport::from(&report)))
    }
}

/// Model reads at once: a read stuck on a hung mount holds a thread, and only this many can.
const MODEL_READS: usize = 8;
/// How long one model read may take (a config and the safetensors headers).
const MODEL_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a model on a blocking thread, bounded in time and in how many run at once.
pub async fn load_model_bounded(path: std::path::PathBuf) -> Result<model::load::Model, Status> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MODEL_READS)));
    // Wait for a slot, but not for ever: when every slot is stuck on a hung mount, say so.
    let permit = match tokio::time::timeout(MODEL_READ_TIMEOUT, slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return Err(Status::unavailable(format!(
                "{MODEL_READS} model reads have been under way for {}s (stuck on a slow filesystem?); retry later",
                MODEL_READ_TIMEOUT.as_secs()
            )));
        }
    };
    let shown = path.display().to_string();
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        model::load_model(&path)
    });
    match tokio::time::timeout(MODEL_READ_TIMEOUT, task).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "reading the model at {shown} took more than {}s (a hung mount?); check the path on the head",
            MODEL_READ_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(Status::internal(format!("model loading task failed: {e}"))),
        Ok(Ok(r)) => r.map_err(model_status),
    }
}

/// Validates the request fields, naming the field on error.
pub fn plan_request(r: &pb::PlanRequest) -> Result<PlanRequest, Status> {
    let size = |field: &str, v: u32| -> Result<Size, Status> {
        match v {
            0 => Ok(Size::Auto),
            v if v <= MAX_SIZE => Ok(Size::Fixed(v as u64)),
            v => Err(Status::invalid_argument(format!("{field}: {v} is more than {MAX_SIZE}"))),
        }
    };
    let util = if r.gpu_memory_utilization == 0.0 { DEFAULT_GPU_MEMORY_UTILIZATION } else { r.gpu_memory_utilization };
    if !(util > 0.0 && util <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "gpu_memory_utilization: {} must be more than 0 and at most 1 (0 means the default {DEFAULT_GPU_MEMORY_UTILIZATION})",
            r.gpu_memory_utilization
        )));
    }
    if r.layer_partition.len() > MAX_SIZE as usize {
        return Err(Status::invalid_argument(format!(
            "layer_partition: {} entries; at most {MAX_SIZE}",
            r.layer_partition.len()
        )));
    }
    Ok(PlanRequest {
        tp: size("tp", r.tp)?,
        pp: size("pp", r.pp)?,
        gpu_memory_utilization: util,
        max_model_len: (r.max_model_len > 0).then_some(r.max_model_len),
        layer_partition: (!r.layer_partition.is_empty()).then(|| r.layer_partition.clone()),
        kv_cache_dtype: match r.kv_cache_dtype.as_str() {
            "" => None,
            v => plan::kv_cache_dtype(v).map_err(|e| Status::invalid_argument(format!("kv_cache_dtype: {e}")))?,
        },
        strict: r.strict,
    })
}

pub fn model_status(e: ModelError) -> Status {
    match &e {
        ModelError::Io { message, .. } if message.contains("No such file") => {
            Status::not_found(format!("{e} (the head reads the model on its own filesystem)"))
        }
        ModelError::Io { .. } => Status::failed_precondition(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}
