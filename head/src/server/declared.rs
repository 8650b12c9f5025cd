//! `--deployments DIR`: deployments declared in files (TOML or YAML, the fields of `tessera
//! deploy`; see `tessera_common::manifest`). The head makes reality match them at start and
//! whenever a file changes: a new file creates its deployments, a changed one updates them
//! (the rolling update, one replica at a time), a file that goes away deletes what it declared.
//! Deployments from the directory are marked `managed_by: deployments-dir`; deployments made by
//! calls are never touched. A file that cannot be read or parsed changes nothing (what it declared
//! before stays), and its error is logged once.
//!
//! The directory is read every `every` (2 s), which also catches files edited in place by a
//! ConfigMap update or a configuration-management run; a deployment deleted by hand comes back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_common::manifest::{self, Manifest};
use tessera_proto::v1 as pb;
use tessera_proto::v1::deployments_server::Deployments as _;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tracing::{info, warn};

use super::deployments::DeploymentsService;

/// The mark of deployments this module owns.
pub const MANAGED_BY: &str = "deployments-dir";

/// What one pass found in the directory.
#[derive(Debug, Default)]
struct Declared {
    /// Name -> (file, Create request).
    wanted: BTreeMap<String, (PathBuf, pb::CreateDeploymentRequest)>,
    /// Files that could not be read: what they declared before is kept.
    broken: HashSet<PathBuf>,
}

/// Reads every deployment file of `dir`; `errors` collects one line per problem.
fn read_dir(dir: &Path, errors: &mut Vec<String>) -> Option<Declared> {
    let files = match manifest::files_in(dir) {
        Ok(f) => f,
        Err(e) => {
            errors.push(e);
            return None;
        }
    };
    let mut d = Declared::default();
    for f in files {
        let parsed = manifest::read_file(&f).and_then(|ms: Vec<Manifest>| {
            ms.iter().map(|m| m.to_request(MANAGED_BY).map(|r| (m.name.clone(), r))).collect::<Result<Vec<_>, _>>()
        });
        match parsed {
            Ok(reqs) => {
                for (name, r) in reqs {
                    if let Some((other, _)) = d.wanted.get(&name) {
                        errors.push(format!(
                            "{}: deployment {name:?} is also declared in {}; the first file (by name) wins",
                            f.display(),
                            other.display()
                        ));
                        continue;
                    }
                    d.wanted.insert(name, (f.clone(), r));
                }
            }
            Err(e) => {
                errors.push(e);
                d.broken.insert(f);
            }
        }
    }
    Some(d)
}

/// Runs until `stop`.
pub async fn run(dir: PathBuf, svc: Arc<DeploymentsService>, every: Duration, stop: CancellationToken) {
    info!(dir = %dir.display(), "deployments declared in files are kept as written");
    // Name -> the request last applied (a file unchanged since is not applied again).
    let mut applied: HashMap<String, pb::CreateDeploymentRequest> = HashMap::new();
    // Name -> the file it came from, to keep what a broken file declared.
    let mut source: HashMap<String, PathBuf> = HashMap::new();
    let mut said: HashSet<String> = HashSet::new();
    loop {
        let mut errors = Vec::new();
        if let Some(declared) = read_dir(&dir, &mut errors) {
            reconcile(&svc, &declared, &mut applied, &mut source, &mut errors).await;
        }
        // Each problem once, until it is gone.
        let now: HashSet<String> = errors.into_iter().collect();
        for e in now.difference(&said) {
            warn!(dir = %dir.display(), "deployments dir: {e}");
        }
        said = now;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn reconcile(
    svc: &Arc<DeploymentsService>,
    declared: &Declared,
    applied: &mut HashMap<String, pb::CreateDeploymentRequest>,
    source: &mut HashMap<String, PathBuf>,
    errors: &mut Vec<String>,
) {
    let current = match svc.list(Request::new(pb::ListDeploymentsRequest {})).await {
        Ok(r) => r.into_inner().deployments,
        Err(e) => {
            errors.push(format!("cannot list the deployments: {}", e.message()));
            return;
        }
    };
    let by_name: HashMap<&str, &pb::Deployment> = current.iter().map(|d| (d.name.as_str(), d)).collect();
    for (name, (file, req)) in &declared.wanted {
        source.insert(name.clone(), file.clone());
        let exists = by_name.get(name.as_str());
        if let Some(d) = exists
            && d.managed_by != MANAGED_BY
        {
            errors.push(format!(
                "{}: deployment {name:?} exists and was not made from this directory; delete it first to hand it over",
                file.display()
            ));
            continue;
        }
        if exists.is_some() && applied.get(name) == Some(req) {
            continue;
        }
        let result = match exists {
            None => svc.create(Request::new(req.clone())).await.map(|_| "created"),
            // A roll takes as long as its replicas take to start: in the background, and
            // only one at a time per deployment (the next pass sees it applied).
            Some(_) => {
                let (svc, req, name, file) = (svc.clone(), req.clone(), name.clone(), file.clone());
                tokio::spawn(async move {
                    let update = pb::UpdateDeploymentRequest { spec: Some(req), max_surge: 1, max_unavailable: 0 };
                    match svc.update(Request::new(update)).await {
                        Ok(_) => info!(deployment = %name, file = %file.display(), "updated to its file"),
                        Err(e) => {
                            warn!(deployment = %name, file = %file.display(), error = %e.message(), "cannot update to its file")
                        }
                    }
                });
                Ok("updating")
            }
        };
        match result {
            Ok(what) => {
                info!(deployment = %name, file = %file.display(), "{what} from its file");
                applied.insert(name.clone(), req.clone());
            }
            Err(e) => errors.push(format!("{}: deployment {name:?}: {}", file.display(), e.message())),
        }
    }
    // What the directory no longer declares goes, unless its file is only unreadable now.
    for d in current.iter().filter(|d| d.managed_by == MANAGED_BY) {
        if declared.wanted.contains_key(&d.name) {
            continue;
        }
        if source.get(&d.name).is_some_and(|f| declared.broken.contains(f)) {
            continue;
        }
        if d.state == pb::DeploymentState::Stopping as i32 || d.state == pb::DeploymentState::Draining as i32 {
            continue;
        }
        match svc.delete(Request::new(pb::DeleteDeploymentRequest { name: d.name.clone() })).await {
            Ok(_) => {
                info!(deployment = %d.name, "deleted: no file declares it any more");
                applied.remove(&d.name);
                source.remove(&d.name);
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => errors.push(format!("cannot delete {}: {}", d.name, e.message())),
        }
    }
}
