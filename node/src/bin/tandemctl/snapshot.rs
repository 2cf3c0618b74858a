//! `tandemctl volume snapshot ...`: snapshot commands and their output.

use super::volume::parse_labels;
use super::*;

#[derive(Serialize)]
pub(super) struct SnapshotOut {
    id: String,
    name: String,
    volume: String,
    size_bytes: u64,
    size: String,
    created_unix_seconds: u64,
    labels: BTreeMap<String, String>,
    state: String,
    nodes: Vec<String>,
    /// Bytes its own layer holds on the answering node (`null`: no copy there).
    local_bytes: Option<u64>,
    /// How long the cut held the volume's I/O (`create` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_seconds: Option<f64>,
}

fn snapshot_out(s: pb::Snapshot) -> SnapshotOut {
    SnapshotOut {
        size: format_size(s.size_bytes),
        labels: s.labels.into_iter().collect(),
        id: s.id,
        name: s.name,
        volume: s.volume,
        size_bytes: s.size_bytes,
        created_unix_seconds: s.created_unix_seconds,
        state: s.state,
        nodes: s.nodes,
        local_bytes: s.local_bytes,
        pause_seconds: s.pause_seconds,
    }
}

fn one(r: pb::SnapshotResponse) -> Result<SnapshotOut, Failure> {
    r.snapshot
        .map(snapshot_out)
        .ok_or_else(|| Failure::usage("daemon returned no snapshot"))
}

pub(super) async fn run_snapshot(
    mut c: VolumeServiceClient<Channel>,
    json: bool,
    cmd: SnapshotCmd,
) -> Result<(), Failure> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            labels,
        } => {
            let labels = parse_labels(&labels)?;
            let s = one(c
                .create_snapshot(pb::CreateSnapshotRequest {
                    volume,
                    name,
                    labels,
                })
                .await?
                .into_inner())?;
            if json {
                print_json(&s);
            } else {
                let pause = s
                    .pause_seconds
                    .map(|p| format!(", I/O paused {:.1} ms", p * 1e3))
                    .unwrap_or_default();
                println!(
                    "Snapshot taken: {} of {} (id {}, on {}{pause})",
                    s.name,
                    s.volume,
                    s.id,
                    s.nodes.join(",")
                );
            }
        }
        SnapshotCmd::List { volume } => {
            let list: Vec<SnapshotOut> = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    volume: volume.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .snapshots
                .into_iter()
                .map(snapshot_out)
                .collect();
            if json {
                print_json(&list);
                return Ok(());
            }
            let mut t = table();
            t.set_header(vec![
                "VOLUME",
                "NAME",
                "ID",
                "SIZE",
                "STATE",
                "CREATED",
                "NODES",
                "OWN BYTES (here)",
            ]);
            for s in list {
                t.add_row(vec![
                    s.volume,
                    s.name,
                    s.id,
                    s.size,
                    s.state,
                    s.created_unix_seconds.to_string(),
                    s.nodes.join(","),
                    s.local_bytes.map(format_size).unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        SnapshotCmd::Inspect { volume, name } => {
            let s = one(c
                .inspect_snapshot(pb::InspectSnapshotRequest { volume, name })
                .await?
                .into_inner())?;
            if json {
                print_json(&s);
                return Ok(());
            }
            let mut t = table();
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            for (k, v) in [
                ("Snapshot", s.name.clone()),
                ("ID", s.id.clone()),
                ("Volume", s.volume.clone()),
                ("Size", s.size.clone()),
                ("State", s.state.clone()),
                ("Created (unix s)", s.created_unix_seconds.to_string()),
                ("Held on", s.nodes.join(",")),
                (
                    "Own bytes on this node",
                    s.local_bytes
                        .map(format_size)
                        .unwrap_or_else(|| "- (no copy here)".into()),
                ),
                (
                    "Labels",
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels
                    },
                ),
            ] {
                t.add_row(vec![format!("{k}:"), v]);
            }
            println!("{t}");
        }
        SnapshotCmd::Delete { volume, name } => {
            let s = one(c
                .delete_snapshot(pb::DeleteSnapshotRequest { volume, name })
                .await?
                .into_inner())?;
            if json {
                print_json(&s);
            } else {
                println!("Snapshot deleted: {} of {} (id {})", s.name, s.volume, s.id);
            }
        }
    }
    Ok(())
}
