//! `tandemctl volume ...`: the volume commands and their output.

use super::*;

#[derive(Serialize)]
pub(super) struct VolumeOut {
    id: String,
    name: String,
    size_bytes: u64,
    size: String,
    repl: u32,
    io_priority: String,
    labels: BTreeMap<String, String>,
    state: String,
    attached_node: Option<String>,
    nbd_uri: Option<String>,
    generation: u64,
    allocated_bytes: u64,
    created_unix_seconds: u64,
    replicas: Vec<ReplicaOut>,
    async_domains: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct ReplicaOut {
    node_id: String,
    domain: String,
    zone: String,
    rack: String,
    state: String,
    /// As the replica's node reports it; `null` when that node did not answer (or, in
    /// `volume list`, for replicas on other nodes, which list does not ask).
    allocated_bytes: Option<u64>,
    resync_done_bytes: u64,
    resync_total_bytes: u64,
    generation: u64,
    /// Async replicas (from the coordinator, when inspected on its node): bytes it has
    /// not acked and the age of the oldest such write (RPO).
    async_lag_bytes: u64,
    async_lag_seconds: f64,
}

pub(super) fn prio_name(v: i32) -> String {
    match pb::IoPriority::try_from(v) {
        Ok(pb::IoPriority::Low) => "low",
        Ok(pb::IoPriority::Medium) => "medium",
        Ok(pb::IoPriority::High) => "high",
        _ => "unspecified",
    }
    .to_string()
}

pub(super) fn prio_to_pb(s: &str) -> Result<pb::IoPriority, Failure> {
    Ok(match s.parse::<IoPriority>().map_err(Failure::usage)? {
        IoPriority::Low => pb::IoPriority::Low,
        IoPriority::Medium => pb::IoPriority::Medium,
        IoPriority::High => pb::IoPriority::High,
    })
}

/// `key=value` labels.
pub(super) fn parse_labels(
    labels: &[String],
) -> Result<std::collections::HashMap<String, String>, Failure> {
    let mut out = std::collections::HashMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            return Err(Failure::usage(format!(
                "invalid label '{l}': expected key=value"
            )));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub(super) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn volume_out(v: pb::Volume) -> VolumeOut {
    VolumeOut {
        size: format_size(v.size_bytes),
        io_priority: prio_name(v.io_priority),
        labels: v.labels.into_iter().collect(),
        attached_node: non_empty(v.attached_node),
        nbd_uri: non_empty(v.nbd_uri),
        replicas: v
            .replicas
            .into_iter()
            .map(|r| ReplicaOut {
                node_id: r.node_id,
                domain: r.domain,
                zone: r.zone,
                rack: r.rack,
                state: r.state,
                allocated_bytes: r.allocated_bytes,
                resync_done_bytes: r.resync_done_bytes,
                resync_total_bytes: r.resync_total_bytes,
                generation: r.generation,
                async_lag_bytes: r.async_lag_bytes,
                async_lag_seconds: r.async_lag_seconds,
            })
            .collect(),
        id: v.id,
        name: v.name,
        size_bytes: v.size_bytes,
        repl: v.repl,
        state: v.state,
        generation: v.generation,
        allocated_bytes: v.allocated_bytes,
        created_unix_seconds: v.created_unix_seconds,
        async_domains: v.async_domains,
    }
}

pub(super) fn print_volume(v: &VolumeOut) {
    let mut t = table();
    let labels = v
        .labels
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect::<Vec<_>>()
        .join(",");
    for (k, val) in [
        ("Volume", v.name.clone()),
        ("ID", v.id.clone()),
        ("Size", v.size.clone()),
        ("Allocated", format_size(v.allocated_bytes)),
        ("Replication factor", v.repl.to_string()),
        ("I/O priority", v.io_priority.clone()),
        (
            "Labels",
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
        ),
        ("State", v.state.clone()),
        (
            "Attached on",
            v.attached_node.clone().unwrap_or_else(|| "-".into()),
        ),
        ("NBD URI", v.nbd_uri.clone().unwrap_or_else(|| "-".into())),
        ("Generation", v.generation.to_string()),
        (
            "Async domains",
            if v.async_domains.is_empty() {
                "-".into()
            } else {
                v.async_domains.join(",")
            },
        ),
    ] {
        t.add_row(vec![format!("{k}:"), val]);
    }
    println!("{t}");
    let mut r = table();
    r.set_header(vec![
        "REPLICA NODE",
        "DOMAIN",
        "ZONE",
        "RACK",
        "STATE",
        "GENERATION",
        "RESYNC",
        "ASYNC LAG",
        "ALLOCATED",
    ]);
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for rep in &v.replicas {
        r.add_row(vec![
            rep.node_id.clone(),
            dash(&rep.domain),
            dash(&rep.zone),
            dash(&rep.rack),
            rep.state.clone(),
            rep.generation.to_string(),
            if rep.resync_total_bytes > 0 {
                format!(
                    "{} / {}",
                    format_size(rep.resync_done_bytes),
                    format_size(rep.resync_total_bytes)
                )
            } else {
                "-".into()
            },
            if rep.state.starts_with("async") {
                format!(
                    "{} / {:.1}s",
                    format_size(rep.async_lag_bytes),
                    rep.async_lag_seconds
                )
            } else {
                "-".into()
            },
            rep.allocated_bytes
                .map(format_size)
                .unwrap_or_else(|| "unknown (node did not answer)".into()),
        ]);
    }
    println!("{r}");
}

pub(super) async fn run_volume(ch: Channel, json: bool, vc: VolumeCmd) -> Result<(), Failure> {
    let mut c = VolumeServiceClient::new(ch);
    match vc {
        VolumeCmd::Create(a) => {
            let size_bytes = parse_size(&a.size).map_err(Failure::usage)?;
            let labels = parse_labels(&a.labels)?;
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    name: a.name,
                    size_bytes,
                    repl: a.repl,
                    io_priority: prio_to_pb(&a.io_priority)? as i32,
                    labels,
                    nodes: a.nodes,
                    zones: a.zones,
                    domains: a.domains,
                    async_domains: a.async_domains,
                })
                .await?
                .into_inner()
                .volume
                .map(volume_out);
            let Some(v) = v else {
                return Err(Failure::usage("daemon returned no volume"));
            };
            if json {
                print_json(&v);
            } else {
                println!("Volume created: {} ({}, id {})", v.name, v.size, v.id);
            }
        }
        VolumeCmd::List => {
            let vols: Vec<VolumeOut> = c
                .list_volumes(pb::ListVolumesRequest {})
                .await?
                .into_inner()
                .volumes
                .into_iter()
                .map(volume_out)
                .collect();
            if json {
                print_json(&vols);
                return Ok(());
            }
            let mut t = table();
            t.set_header(vec![
                "NAME",
                "ID",
                "SIZE",
                "ALLOCATED",
                "HA",
                "PRIORITY",
                "STATE",
                "NODE",
            ]);
            for v in vols {
                t.add_row(vec![
                    v.name,
                    v.id,
                    v.size,
                    format_size(v.allocated_bytes),
                    v.repl.to_string(),
                    v.io_priority,
                    v.state,
                    v.attached_node.unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        VolumeCmd::Inspect { name } => {
            let v = c
                .inspect_volume(pb::InspectVolumeRequest { name })
                .await?
                .into_inner()
                .volume
                .map(volume_out);
            let Some(v) = v else {
                return Err(Failure::usage("daemon returned no volume"));
            };
            if json {
                print_json(&v);
            } else {
                print_volume(&v);
            }
        }
        VolumeCmd::Update(a) => {
            if a.size.is_none() && a.repl.is_none() && a.io_priority.is_none() {
                return Err(Failure::usage(
                    "nothing to update: give --size, --repl or --io-priority",
                ));
            }
            let size_bytes = match &a.size {
                Some(s) => parse_size(s).map_err(Failure::usage)?,
                None => 0,
            };
            if a.repl == Some(0) {
                return Err(Failure::usage("invalid replication factor 0"));
            }
            let io_priority = match &a.io_priority {
                Some(p) => prio_to_pb(p)? as i32,
                None => 0,
            };
            let name = a.name.clone();
            let v = c
                .update_volume(pb::UpdateVolumeRequest {
                    name: a.name,
                    size_bytes,
                    repl: a.repl.unwrap_or(0),
                    io_priority,
                })
                .await?
                .into_inner()
                .volume
                .map(volume_out);
            let Some(v) = v else {
                return Err(Failure::usage("daemon returned no volume"));
            };
            let v = if a.wait {
                wait_in_sync(&mut c, &name, json, a.wait_timeout).await?
            } else {
                v
            };
            if json {
                print_json(&v);
            } else {
                println!(
                    "Volume updated: {} ({}, HA {}, priority {})",
                    v.name, v.size, v.repl, v.io_priority
                );
            }
        }
        VolumeCmd::Delete { name, force } => {
            c.delete_volume(pb::DeleteVolumeRequest {
                name: name.clone(),
                force,
            })
            .await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }));
            } else {
                println!("Volume deleted: {name}");
            }
        }
        VolumeCmd::Attach { name, force } => {
            let r = c
                .attach_volume(pb::AttachVolumeRequest { name, force })
                .await?
                .into_inner();
            let Some(v) = r.volume.map(volume_out) else {
                return Err(Failure::usage("daemon returned no volume"));
            };
            if json {
                print_json(&v);
            } else {
                println!("Volume attached: {} (generation {})", v.name, v.generation);
                println!("NBD URI: {}", r.nbd_uri);
            }
        }
        VolumeCmd::Snapshot(cmd) => return super::snapshot::run_snapshot(c, json, cmd).await,
        VolumeCmd::Verify { name, repair } => {
            let r = c
                .verify_volume(pb::VerifyVolumeRequest {
                    name: name.clone(),
                    repair,
                })
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "volume": name,
                    "blocks_compared": r.blocks_compared,
                    "in_sync_nodes": r.in_sync_nodes,
                    "resyncing_nodes": r.resyncing_nodes,
                    "mismatched_blocks": r.mismatched_blocks,
                    "repaired_blocks": r.repaired_blocks,
                    "mismatches": r.mismatches,
                    "resyncing_mismatched_blocks": r.resyncing_mismatched_blocks,
                    "errors": r.errors,
                }));
            } else {
                println!(
                    "Volume {name}: {} blocks compared across in-sync replicas [{}]",
                    r.blocks_compared,
                    r.in_sync_nodes.join(", ")
                );
                if repair {
                    println!(
                        "Mismatched blocks: {} ({} repaired)",
                        r.mismatched_blocks, r.repaired_blocks
                    );
                } else {
                    println!("Mismatched blocks: {}", r.mismatched_blocks);
                }
                for m in &r.mismatches {
                    println!("  {m}");
                }
                if !r.resyncing_nodes.is_empty() {
                    println!(
                        "Resyncing replicas [{}]: {} blocks still differ",
                        r.resyncing_nodes.join(", "),
                        r.resyncing_mismatched_blocks
                    );
                }
                for e in &r.errors {
                    println!("  not compared: {e}");
                }
            }
            let left = r.mismatched_blocks - r.repaired_blocks.min(r.mismatched_blocks);
            if left > 0 || !r.errors.is_empty() {
                return Err(Failure {
                    msg: format!(
                        "volume '{name}': {left} mismatched blocks{}, {} replicas not compared",
                        if repair { " not repaired" } else { "" },
                        r.errors.len()
                    ),
                    code: 1,
                });
            }
        }
        VolumeCmd::Detach { name } => {
            let v = c
                .detach_volume(pb::DetachVolumeRequest { name })
                .await?
                .into_inner()
                .volume
                .map(volume_out);
            let Some(v) = v else {
                return Err(Failure::usage("daemon returned no volume"));
            };
            if json {
                print_json(&v);
            } else {
                println!("Volume detached: {}", v.name);
            }
        }
    }
    Ok(())
}

/// Polls the volume until every replica is in sync, drawing resync progress.
pub(super) async fn wait_in_sync(
    c: &mut VolumeServiceClient<Channel>,
    name: &str,
    quiet: bool,
    timeout_s: u64,
) -> Result<VolumeOut, Failure> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(format!("resyncing {name}"));
        b
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    loop {
        let v = c
            .inspect_volume(pb::InspectVolumeRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner()
            .volume
            .map(volume_out)
            .ok_or_else(|| Failure::usage("daemon returned no volume"))?;
        if v.replicas.iter().all(|r| r.state == "in-sync") && v.replicas.len() == v.repl as usize {
            bar.finish_and_clear();
            return Ok(v);
        }
        if v.attached_node.is_none() {
            bar.abandon();
            return Err(Failure {
                msg: format!(
                    "volume '{name}' is detached: its new replicas resync once it is attached (the coordinator copies the data)"
                ),
                code: 1,
            });
        }
        let total: u64 = v.replicas.iter().map(|r| r.resync_total_bytes).sum();
        let done: u64 = v.replicas.iter().map(|r| r.resync_done_bytes).sum();
        bar.set_length(total.max(1));
        bar.set_position(done);
        if std::time::Instant::now() > deadline {
            bar.abandon();
            return Err(Failure {
                msg: format!("volume '{name}' not in sync after {timeout_s} s"),
                code: 1,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
