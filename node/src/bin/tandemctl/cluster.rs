//! `tandemctl cluster ...` and `tandemctl alerts ...`.

use super::*;

#[derive(Serialize)]
pub(super) struct NodeOut {
    id: u64,
    name: String,
    role: String,
    leader: bool,
    raft_voter: bool,
    health: String,
    domain: String,
    zone: String,
    rack: String,
    admin_addr: String,
    data_addr: String,
    pool_size_bytes: u64,
    provisioned_bytes: u64,
}

pub(super) fn node_out(n: pb::NodeInfo) -> NodeOut {
    NodeOut {
        id: n.id,
        name: n.name,
        role: n.role,
        leader: n.is_leader,
        raft_voter: n.raft_voter,
        health: n.health,
        domain: n.domain,
        zone: n.zone,
        rack: n.rack,
        admin_addr: n.admin_addr,
        data_addr: n.data_addr,
        pool_size_bytes: n.pool_size_bytes,
        provisioned_bytes: n.provisioned_bytes,
    }
}

pub(super) fn print_nodes(nodes: &[NodeOut]) {
    let mut t = table();
    t.set_header(vec![
        "ID",
        "NAME",
        "ROLE",
        "HEALTH",
        "DOMAIN",
        "ZONE",
        "RACK",
        "ADMIN",
        "DATA",
        "POOL",
        "PROVISIONED",
    ]);
    for n in nodes {
        t.add_row(vec![
            n.id.to_string(),
            n.name.clone(),
            if n.leader {
                format!("{} (leader)", n.role)
            } else {
                n.role.clone()
            },
            n.health.clone(),
            n.domain.clone(),
            n.zone.clone(),
            n.rack.clone(),
            n.admin_addr.clone(),
            n.data_addr.clone(),
            format_size(n.pool_size_bytes),
            format_size(n.provisioned_bytes),
        ]);
    }
    println!("{t}");
}

pub(super) async fn run_cluster(ch: Channel, json: bool, cmd: ClusterCmd) -> Result<(), Failure> {
    let mut c = ClusterServiceClient::new(ch);
    match cmd {
        ClusterCmd::List => {
            let nodes: Vec<NodeOut> = c
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes
                .into_iter()
                .map(node_out)
                .collect();
            if json {
                print_json(&nodes);
            } else {
                print_nodes(&nodes);
            }
        }
        ClusterCmd::Inspect => {
            let r = c
                .inspect_cluster(pb::InspectClusterRequest {})
                .await?
                .into_inner();
            let nodes: Vec<NodeOut> = r.nodes.into_iter().map(node_out).collect();
            if json {
                print_json(&serde_json::json!({
                    "cluster_id": r.cluster_id,
                    "leader_id": r.leader_id,
                    "term": r.term,
                    "commit_index": r.commit_index,
                    "applied_index": r.applied_index,
                    "local_node_id": r.local_node_id,
                    "voters": r.voters,
                    "learners": r.learners,
                    "warnings": r.warnings,
                    "volume_count": r.volume_count,
                    "nodes": nodes,
                }));
                return Ok(());
            }
            let mut t = table();
            for (k, v) in [
                ("Cluster ID", r.cluster_id.clone()),
                ("Leader", r.leader_id.to_string()),
                ("Term", r.term.to_string()),
                ("Commit index", r.commit_index.to_string()),
                ("Applied index", r.applied_index.to_string()),
                ("This node", r.local_node_id.to_string()),
                ("Voters", format!("{:?}", r.voters)),
                ("Learners", format!("{:?}", r.learners)),
                ("Volumes", r.volume_count.to_string()),
            ] {
                t.add_row(vec![format!("{k}:"), v]);
            }
            println!("{t}");
            for w in &r.warnings {
                println!("Warning: {w}");
            }
            print_nodes(&nodes);
        }
        ClusterCmd::Latency => {
            let r = c.latency(pb::LatencyRequest {}).await?.into_inner();
            let pair = |p: &pb::RttPair| {
                serde_json::json!({
                    "from": p.from, "to": p.to, "p50_us": p.p50_us, "p99_us": p.p99_us,
                    "samples": p.samples, "age_seconds": p.age_seconds, "pairs": p.pairs,
                    "sync_allowed": p.sync_allowed,
                })
            };
            if json {
                print_json(&serde_json::json!({
                    "sync_max_rtt_us": r.sync_max_rtt_us,
                    "nodes": r.nodes.iter().map(pair).collect::<Vec<_>>(),
                    "domains": r.domains.iter().map(pair).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            let mut t = table();
            t.set_header(vec!["FROM", "TO", "P50", "P99", "SAMPLES", "AGE"]);
            for p in &r.nodes {
                t.add_row(vec![
                    p.from.clone(),
                    p.to.clone(),
                    ms(p.p50_us),
                    ms(p.p99_us),
                    p.samples.to_string(),
                    format!("{}s", p.age_seconds),
                ]);
            }
            println!("{t}");
            let mut d = table();
            d.set_header(vec![
                "DOMAIN",
                "DOMAIN",
                "P50",
                "P99",
                "NODE PAIRS",
                "METRO SYNC",
            ]);
            for p in &r.domains {
                d.add_row(vec![
                    p.from.clone(),
                    p.to.clone(),
                    if p.pairs == 0 {
                        "-".into()
                    } else {
                        ms(p.p50_us)
                    },
                    if p.pairs == 0 {
                        "-".into()
                    } else {
                        ms(p.p99_us)
                    },
                    p.pairs.to_string(),
                    if p.sync_allowed {
                        "allowed".into()
                    } else if p.pairs == 0 {
                        "refused (no samples)".into()
                    } else {
                        "refused (above limit)".into()
                    },
                ]);
            }
            println!("{d}");
            println!("Sync limit (--sync-max-rtt): {}", ms(r.sync_max_rtt_us));
        }
        ClusterCmd::Domains(cmd) => {
            let r = match cmd {
                DomainsCmd::Show => c.list_domains(pb::ListDomainsRequest {}).await?,
                DomainsCmd::Activate { name } => {
                    c.set_domain_active(pb::SetDomainActiveRequest {
                        domain: name,
                        active: true,
                        promote_async: false,
                    })
                    .await?
                }
                DomainsCmd::Deactivate {
                    name,
                    promote_async,
                } => {
                    c.set_domain_active(pb::SetDomainActiveRequest {
                        domain: name,
                        active: false,
                        promote_async,
                    })
                    .await?
                }
            }
            .into_inner();
            if json {
                let v: Vec<_> = r
                    .domains
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "name": d.name, "active": d.active, "nodes": d.nodes,
                            "volumes": d.volumes.iter().map(|v| serde_json::json!({"volume": v.volume, "status": v.status})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                if r.unavailable_volumes.is_empty() {
                    print_json(&v);
                } else {
                    print_json(&serde_json::json!({
                        "domains": v,
                        "unavailable_volumes": r.unavailable_volumes,
                    }));
                }
                return Ok(());
            }
            if !r.unavailable_volumes.is_empty() {
                eprintln!(
                    "warning: these volumes have no in-sync copy outside the domain and stay unavailable until it is activated again (nothing was deleted): {}",
                    r.unavailable_volumes.join(", ")
                );
            }
            let mut t = table();
            t.set_header(vec!["DOMAIN", "STATE", "NODES", "VOLUMES"]);
            for d in r.domains {
                t.add_row(vec![
                    d.name,
                    if d.active { "active" } else { "inactive" }.to_string(),
                    d.nodes.join(", "),
                    d.volumes
                        .iter()
                        .map(|v| format!("{} ({})", v.volume, v.status))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]);
            }
            println!("{t}");
        }
        ClusterCmd::Remove { node } => {
            let r = c
                .remove_node(pb::RemoveNodeRequest { node })
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::json!({"id": r.id, "name": r.name, "removed": true}));
            } else {
                println!("Node {} ({}) removed from the cluster", r.name, r.id);
            }
        }
        ClusterCmd::Token(TokenCmd::Show) => {
            let r = c.show_token(pb::ShowTokenRequest {}).await?.into_inner();
            if json {
                print_json(&serde_json::json!({"cluster_id": r.cluster_id, "token": r.token}));
            } else {
                println!("Cluster ID: {}", r.cluster_id);
                println!("Join token: {}", r.token);
            }
        }
    }
    Ok(())
}

pub(super) async fn run_alerts(ch: Channel, json: bool) -> Result<(), Failure> {
    let alerts = ClusterServiceClient::new(ch)
        .list_alerts(pb::ListAlertsRequest {})
        .await?
        .into_inner()
        .alerts;
    if json {
        let v: Vec<_> = alerts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id, "unix_seconds": a.unix_seconds, "severity": a.severity,
                    "kind": a.kind, "resource": a.resource, "message": a.message,
                })
            })
            .collect();
        print_json(&v);
        return Ok(());
    }
    let mut t = table();
    t.set_header(vec![
        "ID", "TIME", "SEVERITY", "KIND", "RESOURCE", "MESSAGE",
    ]);
    for a in alerts {
        t.add_row(vec![
            a.id.to_string(),
            a.unix_seconds.to_string(),
            a.severity,
            a.kind,
            a.resource,
            a.message,
        ]);
    }
    println!("{t}");
    Ok(())
}
