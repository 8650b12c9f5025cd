//! `tessera nodes`, `tessera status`, `tessera events`, `tessera drain`.

use std::io::Write;

use serde_json::{Value, json};
use tessera_common::size::HumanBytes;
use tessera_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::Output;
use crate::client::{self, StatusContext};
use crate::table::Table;

pub fn state_name(s: i32) -> &'static str {
    match pb::NodeState::try_from(s).unwrap_or(pb::NodeState::Unspecified) {
        pb::NodeState::Alive => "alive",
        pb::NodeState::Suspect => "suspect",
        pb::NodeState::Dead => "dead",
        pb::NodeState::Left => "left",
        pb::NodeState::Draining => "draining",
        pb::NodeState::PendingApproval => "pending-approval",
        pb::NodeState::Unspecified => "unknown",
    }
}

/// The JSON shape of a node (documented in the README; scripts depend on it).
pub fn node_json(n: &pb::Node) -> Value {
    let inv = n.inventory.clone().unwrap_or_default();
    let gpus: Vec<Value> = inv
        .gpus
        .iter()
        .map(|g| {
            json!({
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_used_bytes": g.memory_used_bytes,
                "compute_capability": format!("{}.{}", g.compute_capability_major, g.compute_capability_minor),
                "pci_bus_id": crate::deploy::some(&g.pci_bus_id),
                "numa_node": g.numa_node,
                "nvlink_peers": g.nvlink_peers,
                "mig_enabled": g.mig_enabled,
                "fake": g.fake,
            })
        })
        .collect();
    let mut labels = serde_json::Map::new();
    let mut keys: Vec<_> = n.labels.iter().collect();
    keys.sort();
    for (k, v) in keys {
        labels.insert(k.clone(), Value::String(v.clone()));
    }
    json!({
        "id": n.id,
        "name": n.name,
        "state": state_name(n.state),
        "state_reason": crate::deploy::some(&n.state_reason),
        "address": n.address,
        "is_head": n.is_head,
        "draining": n.draining,
        "labels": labels,
        "hostname": n.hostname,
        "version": n.version,
        "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
        "state_since_ms_ago": n.state_since_ms_ago,
        "joined_ms_ago": n.joined_ms_ago,
        "driver_version": crate::deploy::some(&inv.driver_version),
        "cuda_driver_version": crate::deploy::some(&inv.cuda_driver_version),
        "inventory_source": inv.source,
        "gpus": gpus,
        "engines": n.capabilities.as_ref().map(|c| json!({
            "vllm_version": (!c.vllm_version.is_empty()).then_some(&c.vllm_version),
            "vllm_missing": (!c.vllm_missing.is_empty()).then_some(&c.vllm_missing),
            "command_allowed": c.command_allowed,
        })),
    })
}

/// What a node can run: "probe, vllm 0.33.0, command", or "?" when its worker does not say.
pub fn engines(c: Option<&pb::Capabilities>) -> String {
    let Some(c) = c else { return "?".into() };
    let mut parts = vec!["probe".to_string()];
    if !c.vllm_version.is_empty() {
        parts.push(format!("vllm {}", c.vllm_version));
    }
    if c.command_allowed {
        parts.push("command".into());
    }
    parts.join(", ")
}

/// "4x Fake GPU 80GiB (fake)", "8x NVIDIA H100 80GB HBM3", "2x A, 1x B", or "-".
pub fn gpu_summary(inv: Option<&pb::Inventory>) -> String {
    let Some(inv) = inv else { return "-".into() };
    if inv.gpus.is_empty() {
        return "-".into();
    }
    let mut groups: Vec<(String, usize)> = Vec::new();
    for g in &inv.gpus {
        let label = if g.fake { format!("{} (fake)", g.name) } else { g.name.clone() };
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => groups.push((label, 1)),
        }
    }
    groups.iter().map(|(l, n)| format!("{n}x {l}")).collect::<Vec<_>>().join(", ")
}

fn ago(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 120_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 7_200_000 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}h", ms / 3_600_000)
    }
}

pub fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&["ID", "NAME", "ROLE", "STATE", "ADDRESS", "GPUS", "ENGINES", "HEARTBEAT", "LABELS"]);
    for n in nodes {
        let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        t.row(vec![
            n.id.chars().take(8).collect(),
            n.name.clone(),
            if n.is_head { "head" } else { "worker" }.to_string(),
            state_name(n.state).to_string(),
            n.address.clone(),
            gpu_summary(n.inventory.as_ref()),
            engines(n.capabilities.as_ref()),
            format!("{} ago", ago(n.last_heartbeat_ms_ago)),
            if labels.is_empty() { "-".into() } else { labels.join(",") },
        ]);
    }
    t.render()
}

pub async fn nodes(head: &str, output: Output) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let nodes = list_all(&mut c).await?;
    match output {
        Output::Json | Output::Yaml => {
            crate::output::print(output, &Value::Array(nodes.iter().map(node_json).collect()))
        }
        Output::Text | Output::Wide if nodes.is_empty() => println!("no nodes have joined yet"),
        Output::Wide => {
            // Which deployment (replica) holds each GPU, from the deployments' ranks.
            let mut held: std::collections::BTreeMap<(String, u32), String> = Default::default();
            if let Ok(conn) = client::connect(head).await {
                let mut d = pb::deployments_client::DeploymentsClient::new(conn);
                if let Ok(list) = d.list(pb::ListDeploymentsRequest {}).await {
                    for dep in list.into_inner().deployments {
                        let groups: Vec<(String, &Vec<pb::Rank>)> = if dep.replicas.len() > 1 {
                            dep.replicas.iter().map(|r| (format!("{}.{}", dep.name, r.index), &r.ranks)).collect()
                        } else {
                            vec![(dep.name.clone(), &dep.ranks)]
                        };
                        for (name, ranks) in groups {
                            for r in ranks.iter() {
                                for g in &r.gpu_indices {
                                    held.insert((r.node.clone(), *g), name.clone());
                                }
                            }
                        }
                    }
                }
            }
            let mut t = Table::new(&["NAME", "STATE", "GPU", "MEMORY", "USED", "HELD BY"]);
            for n in &nodes {
                for g in n.inventory.as_ref().map(|i| i.gpus.as_slice()).unwrap_or_default() {
                    t.row(vec![
                        n.name.clone(),
                        state_name(n.state).to_string(),
                        g.index.to_string(),
                        HumanBytes(g.memory_total_bytes).to_string(),
                        HumanBytes(g.memory_used_bytes).to_string(),
                        held.get(&(n.name.clone(), g.index)).cloned().unwrap_or_else(|| "-".into()),
                    ]);
                }
            }
            print!("{}", nodes_table(&nodes));
            println!();
            print!("{}", t.render());
        }
        Output::Text => {
            print!("{}", nodes_table(&nodes));
            for n in nodes
                .iter()
                .filter(|n| n.state == pb::NodeState::Dead as i32 || n.state == pb::NodeState::Suspect as i32)
            {
                println!("  {} {}: {}", n.name, state_name(n.state), n.state_reason);
            }
        }
    }
    Ok(())
}

/// GPUs held by deployments (every rank of every replica that holds its GPUs), and the pending
/// deployments with why; `None` when the token may not list deployments.
async fn holdings(head: &str) -> Option<(u32, Vec<(String, String)>)> {
    let mut d = pb::deployments_client::DeploymentsClient::new(client::connect(head).await.ok()?);
    let list = d.list(pb::ListDeploymentsRequest {}).await.ok()?.into_inner().deployments;
    let holds = |s: i32| {
        !matches!(
            pb::DeploymentState::try_from(s).unwrap_or(pb::DeploymentState::Unspecified),
            pb::DeploymentState::Pending | pb::DeploymentState::Failed | pb::DeploymentState::Stopped
        )
    };
    let mut reserved = 0u32;
    let mut pending = Vec::new();
    for dep in &list {
        let replicas: Vec<(i32, usize)> = if dep.replicas.is_empty() {
            vec![(dep.state, dep.ranks.iter().map(|r| r.gpu_indices.len().max(1)).sum())]
        } else {
            dep.replicas.iter().map(|r| (r.state, r.ranks.iter().map(|r| r.gpu_indices.len().max(1)).sum())).collect()
        };
        reserved += replicas.iter().filter(|(s, _)| holds(*s)).map(|(_, n)| *n as u32).sum::<u32>();
        if dep.state == pb::DeploymentState::Pending as i32 {
            pending.push((dep.name.clone(), dep.message.clone()));
        }
    }
    Some((reserved, pending))
}

pub async fn status(head: &str, output: Output) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let s = c.get_status(pb::GetStatusRequest {}).await.or_status()?;
    let held = holdings(head).await;
    match output {
        Output::Json | Output::Yaml => {
            let v = json!({
                "head": head,
                "head_version": s.head_version,
                "head_instance_id": s.head_instance_id,
                "head_uptime_ms": s.head_uptime_ms,
                "nodes": {
                    "total": s.nodes_total, "alive": s.nodes_alive, "suspect": s.nodes_suspect,
                    "dead": s.nodes_dead, "left": s.nodes_left, "draining": s.nodes_draining,
                },
                "gpus": {
                    "total": s.gpus_total, "fake": s.gpus_fake, "memory_total_bytes": s.gpu_memory_total_bytes,
                    "reserved": held.as_ref().map(|h| h.0),
                    "free": held.as_ref().map(|h| s.gpus_total.saturating_sub(h.0)),
                },
                "pending": held.as_ref().map(|h| h.1.iter().map(|(n, m)| json!({"name": n, "why": m})).collect::<Vec<_>>()),
                "failure_detection": {
                    "heartbeat_interval_ms": s.heartbeat_interval_ms,
                    "node_timeout_ms": s.node_timeout_ms,
                    "reconnect_grace_ms": s.reconnect_grace_ms,
                },
            });
            crate::output::print(output, &v);
        }
        Output::Text | Output::Wide => {
            println!("head       {head} (tessera {}, up {})", s.head_version, ago(s.head_uptime_ms));
            let mut parts = vec![format!("{} alive", s.nodes_alive)];
            for (n, what) in [
                (s.nodes_draining, "draining"),
                (s.nodes_suspect, "suspect"),
                (s.nodes_dead, "dead"),
                (s.nodes_left, "left"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            println!("nodes      {} ({})", s.nodes_total, parts.join(", "));
            let fake = if s.gpus_fake > 0 { format!(", {} of them fake", s.gpus_fake) } else { String::new() };
            println!("gpus       {} with {} in all{fake}", s.gpus_total, HumanBytes(s.gpu_memory_total_bytes));
            if let Some((reserved, pending)) = &held {
                println!(
                    "           {reserved} reserved by deployments, {} free",
                    s.gpus_total.saturating_sub(*reserved)
                );
                for (name, why) in pending {
                    println!("pending    {name}: {why}");
                }
            }
            println!(
                "detection  heartbeat every {}ms; dead after {}ms of silence or {}ms without a session",
                s.heartbeat_interval_ms, s.node_timeout_ms, s.reconnect_grace_ms
            );
        }
    }
    Ok(())
}

pub fn event_json(e: &pb::Event) -> Value {
    let kind = match pb::EventKind::try_from(e.kind).unwrap_or(pb::EventKind::Unspecified) {
        pb::EventKind::NodeJoined => "node_joined",
        pb::EventKind::NodeStateChanged => "node_state_changed",
        pb::EventKind::NodeLeft => "node_left",
        pb::EventKind::NodeRemoved => "node_removed",
        pb::EventKind::DeploymentChanged => "deployment_changed",
        pb::EventKind::Unspecified => "unknown",
    };
    // What is replayed first (the current members and deployments) carries no event time: when
    // each entered its state.
    let since = e.node.as_ref().map(|n| n.state_since_ms_ago).or(e.deployment.as_ref().map(|d| d.state_since_ms_ago));
    let unix_ms = match (e.unix_ms, since) {
        (0, Some(ago)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64);
            now.unwrap_or(0).saturating_sub(ago)
        }
        (t, _) => t,
    };
    if let Some(d) = &e.deployment {
        return json!({
            "seq": e.seq,
            "time": rfc3339(unix_ms),
            "unix_ms": e.unix_ms,
            "kind": kind,
            "deployment": d.name,
            "state": crate::deploy::state_name(d.state),
            "generation": d.generation,
            "restarts": d.restarts,
            "reason": (!e.reason.is_empty()).then_some(&e.reason),
        });
    }
    let node = e.node.as_ref();
    json!({
        "seq": e.seq,
        "time": rfc3339(unix_ms),
        "unix_ms": e.unix_ms,
        "kind": kind,
        "node_id": node.map(|n| n.id.clone()),
        "node_name": node.map(|n| n.name.clone()),
        "state": node.map(|n| state_name(n.state)),
        "previous_state": (e.previous_state != 0).then(|| state_name(e.previous_state)),
        "reason": (!e.reason.is_empty()).then_some(&e.reason),
        "rejoined": e.rejoined,
    })
}

/// RFC 3339 in UTC to the millisecond (`2026-11-28T03:56:12.345Z`); null for an unknown time.
pub fn rfc3339(unix_ms: u64) -> Value {
    if unix_ms == 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    Value::String(humantime::format_rfc3339_millis(t).to_string())
}

pub async fn events(head: &str, follow: bool, output: Output) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let mut stream = c.watch_events(pb::WatchEventsRequest { include_current: true }).await.or_status()?;
    let mut out = std::io::stdout();
    let mut replaying = true;
    let wait = std::time::Duration::from_millis(if follow { u64::MAX / 4 } else { 300 });
    loop {
        let next = match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(e))) => e,
            Ok(Some(Err(s))) => return Err(client::status_error(s)),
            // Following: the stream ends only when the head goes away (or shuts down).
            Ok(None) if follow => anyhow::bail!("the head at {head} ended the event stream (it stopped or restarted)"),
            Ok(None) | Err(_) => return Ok(()),
        };
        if replaying && next.seq != 0 {
            replaying = false;
        }
        match output {
            Output::Json => writeln!(out, "{}", event_json(&next))?,
            Output::Yaml => write!(out, "---\n{}", crate::output::yaml(&event_json(&next)))?,
            Output::Text | Output::Wide => {
                let v = event_json(&next);
                let name = v["node_name"].as_str().or(v["deployment"].as_str()).unwrap_or("?");
                let state = v["state"].as_str().unwrap_or("?");
                let what = match v["kind"].as_str() {
                    Some("node_joined") if replaying => "member",
                    Some("node_joined") => "joined",
                    Some("node_left") => "left",
                    Some("deployment_changed") if replaying => "deploy",
                    Some("deployment_changed") => "deploy",
                    _ => "state",
                };
                // The time of day (UTC) to the second.
                let time = v["time"].as_str().and_then(|t| t.get(11..19)).unwrap_or("-");
                writeln!(out, "{time} {:<7} {:<20} {:<9} {}", what, name, state, next.reason)?;
            }
        }
        out.flush()?;
    }
}

/// Every node, a page at a time (a cluster of 10,000 nodes is more than one message holds).
pub async fn list_all(c: &mut pb::cluster_client::ClusterClient<client::Conn>) -> anyhow::Result<Vec<pb::Node>> {
    let mut nodes = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c.list_nodes(pb::ListNodesRequest { page_size: 1000, page_token }).await.or_status()?;
        nodes.extend(page.nodes);
        if page.next_page_token.is_empty() {
            return Ok(nodes);
        }
        page_token = page.next_page_token;
    }
}

pub async fn create_token(head: &str, ttl: std::time::Duration, uses: u32) -> anyhow::Result<()> {
    let mut c = pb::tokens_client::TokensClient::new(client::connect(head).await?);
    let r = c.create_join_token(pb::CreateJoinTokenRequest { ttl_s: ttl.as_secs().max(1), uses }).await.or_status()?;
    println!("{}", r.token);
    eprintln!(
        "joins at most {} node(s) within {}; give it to workers as --token or --token-file",
        r.uses,
        tessera_common::duration::format_duration(ttl)
    );
    Ok(())
}

pub async fn rotate_join(head: &str) -> anyhow::Result<()> {
    let mut c = pb::tokens_client::TokensClient::new(client::connect(head).await?);
    let r = c.rotate_join_token(pb::RotateJoinTokenRequest {}).await.or_status()?;
    println!("{}", r.join_token);
    eprintln!(
        "the new join token is written to {} on the head; the old one no longer joins nodes (joined nodes keep working)",
        r.written_to
    );
    Ok(())
}

pub async fn approve(head: &str, node: String) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let n = c.approve_node(pb::DrainNodeRequest { node, evict: false }).await.or_status()?;
    println!("{} ({}) is approved and {}", n.name, n.id, state_name(n.state));
    Ok(())
}

pub async fn remove(head: &str, node: String) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let n = c.remove_node(pb::RemoveNodeRequest { node }).await.or_status()?;
    println!("{} ({}) was {} and is forgotten", n.name, n.id, state_name(n.state));
    Ok(())
}

pub async fn drain(head: &str, node: String, draining: bool, evict: bool) -> anyhow::Result<()> {
    let mut c = client::cluster(head).await?;
    let req = pb::DrainNodeRequest { node, evict };
    let n = if draining { c.drain_node(req).await } else { c.undrain_node(req).await }.or_status()?;
    println!("{} ({}) is {}", n.name, &n.id, state_name(n.state));
    if evict {
        println!("what ran there restarts on the other nodes (`tessera deployments` shows where)");
    }
    Ok(())
}
