//! CSI conformance: every advertised RPC through a real gRPC client on tandemd's unix
//! socket: required-field errors, NOT_FOUND for unknown ids, idempotency (each call
//! repeated), pagination, and capability-based behaviour.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tandem_proto::csi::v1 as csi;
use tandem_tests::csi::{block_cap, csi_args, mount_cap, Csi, RWO};
use tandem_tests::{eventually, Daemon, DaemonOpts};
use tonic::Code;

use csi::volume_capability::access_mode::Mode;

fn daemon() -> (Daemon, Csi) {
    let dir = tempfile::tempdir().unwrap().keep();
    let sock = dir.join("csi.sock");
    let mut extra = csi_args(&sock);
    extra.extend([
        "--name".into(),
        "n1".into(),
        "--domain".into(),
        "east".into(),
    ]);
    let d = Daemon::start(DaemonOpts {
        pool_size: Some("8GiB".into()),
        extra_args: extra,
        ..Default::default()
    });
    let c = Csi::connect(&sock);
    (d, c)
}

fn create_req(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("", RWO)],
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "errors carry a message");
            s.code()
        }
    }
}

#[test]
fn identity_reports_the_driver_its_capabilities_and_readiness() {
    let (_d, c) = daemon();
    let mut id = c.identity.clone();
    let info = c
        .call(id.get_plugin_info(csi::GetPluginInfoRequest {}))
        .unwrap();
    assert_eq!(info.name, "csi.tandem.io");
    assert!(!info.vendor_version.is_empty());
    let caps = c
        .call(id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}))
        .unwrap();
    use csi::plugin_capability::Type;
    let mut services = BTreeSet::new();
    let mut expansion = None;
    for cap in caps.capabilities {
        match cap.r#type.unwrap() {
            Type::Service(s) => {
                services.insert(s.r#type);
            }
            Type::VolumeExpansion(e) => expansion = Some(e.r#type),
        }
    }
    use csi::plugin_capability::service::Type as S;
    assert_eq!(
        services,
        BTreeSet::from([
            S::ControllerService as i32,
            S::VolumeAccessibilityConstraints as i32
        ])
    );
    assert_eq!(
        expansion,
        Some(csi::plugin_capability::volume_expansion::Type::Online as i32)
    );
    eventually(Duration::from_secs(20), "probe ready", || {
        let p = c.call(id.probe(csi::ProbeRequest {})).unwrap();
        (p.ready == Some(true)).then_some(())
    });
    // Repeatable.
    assert_eq!(
        c.call(id.probe(csi::ProbeRequest {})).unwrap().ready,
        Some(true)
    );
}

#[test]
fn controller_create_validates_and_is_idempotent_by_name() {
    let (_d, c) = daemon();
    let mut ctl = c.controller.clone();

    // Required fields.
    assert_eq!(
        code(c.call(ctl.create_volume(create_req("", 1 << 20)))),
        Code::InvalidArgument
    );
    let mut no_caps = create_req("v", 1 << 20);
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(c.call(ctl.create_volume(no_caps))),
        Code::InvalidArgument
    );
    let mut no_mode = create_req("v", 1 << 20);
    no_mode.volume_capabilities[0].access_mode = None;
    assert_eq!(
        code(c.call(ctl.create_volume(no_mode))),
        Code::InvalidArgument
    );
    let mut no_type = create_req("v", 1 << 20);
    no_type.volume_capabilities[0].access_type = None;
    assert_eq!(
        code(c.call(ctl.create_volume(no_type))),
        Code::InvalidArgument
    );
    // Unsupported: multi-node modes, unknown filesystems and parameters, clones.
    let mut multi = create_req("v", 1 << 20);
    multi.volume_capabilities = vec![mount_cap("", Mode::MultiNodeMultiWriter)];
    assert_eq!(
        code(c.call(ctl.create_volume(multi))),
        Code::InvalidArgument
    );
    let mut btrfs = create_req("v", 1 << 20);
    btrfs.volume_capabilities = vec![mount_cap("btrfs", RWO)];
    assert_eq!(
        code(c.call(ctl.create_volume(btrfs))),
        Code::InvalidArgument
    );
    let mut small_xfs = create_req("v", 1 << 20);
    small_xfs.volume_capabilities = vec![mount_cap("xfs", RWO)];
    assert_eq!(code(c.call(ctl.create_volume(small_xfs))), Code::OutOfRange);
    let mut typo = create_req("v", 1 << 20);
    typo.parameters = HashMap::from([("replicas".into(), "3".into())]);
    let e = c.call(ctl.create_volume(typo)).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("replicas"), "{}", e.message());
    let mut clone = create_req("v", 1 << 20);
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: "other".into(),
            },
        )),
    });
    assert_eq!(
        code(c.call(ctl.create_volume(clone))),
        Code::InvalidArgument
    );
    let mut negative = create_req("v", -1);
    negative.capacity_range.as_mut().unwrap().required_bytes = -1;
    assert_eq!(
        code(c.call(ctl.create_volume(negative))),
        Code::InvalidArgument
    );
    let mut tiny_limit = create_req("v", 0);
    tiny_limit.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 100,
    });
    assert_eq!(
        code(c.call(ctl.create_volume(tiny_limit))),
        Code::OutOfRange
    );
    // Every replica async (the only domain is east) is refused.
    let mut all_async = create_req("v", 1 << 20);
    all_async.parameters = HashMap::from([("async_domains".into(), "east".into())]);
    let e = c.call(ctl.create_volume(all_async)).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("async"), "{}", e.message());
    // Three replicas on a one-node cluster cannot be placed.
    let mut rf3 = create_req("v3", 1 << 20);
    rf3.parameters = HashMap::from([("repl".into(), "3".into())]);
    assert_eq!(
        code(c.call(ctl.create_volume(rf3))),
        Code::ResourceExhausted
    );

    // Create, rounded up to 4 KiB; every repeat returns the same volume.
    let mut req = create_req("pvc-one", 10_000_000);
    req.parameters = HashMap::from([
        ("priority_io".into(), "high".into()),
        ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
    ]);
    let v1 = c
        .call(ctl.create_volume(req.clone()))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(v1.volume_id, "pvc-one");
    assert_eq!(v1.capacity_bytes, 10_002_432);
    assert_eq!(v1.volume_context["priority_io"], "high");
    assert_eq!(v1.volume_context["fs"], "ext4");
    assert_eq!(
        v1.accessible_topology[0].segments["topology.tandem.io/domain"],
        "east"
    );
    let v2 = c
        .call(ctl.create_volume(req.clone()))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(v1, v2);
    // Same name, incompatible size or parameters: ALREADY_EXISTS.
    let mut bigger = req.clone();
    bigger.capacity_range.as_mut().unwrap().required_bytes = 1 << 30;
    assert_eq!(code(c.call(ctl.create_volume(bigger))), Code::AlreadyExists);
    let mut other_prio = req.clone();
    other_prio
        .parameters
        .insert("priority_io".into(), "low".into());
    assert_eq!(
        code(c.call(ctl.create_volume(other_prio))),
        Code::AlreadyExists
    );
    let mut other_fs = req.clone();
    other_fs.parameters.insert("fs".into(), "xfs".into());
    assert_eq!(
        code(c.call(ctl.create_volume(other_fs))),
        Code::AlreadyExists
    );

    // A CSI name that is not a valid Tandem name maps to a stable id.
    let odd = c
        .call(ctl.create_volume(create_req("my volume #1", 1 << 20)))
        .unwrap()
        .volume
        .unwrap();
    assert!(odd.volume_id.starts_with("csi-"), "{}", odd.volume_id);
    let again = c
        .call(ctl.create_volume(create_req("my volume #1", 1 << 20)))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(odd.volume_id, again.volume_id);

    // Delete: required id, idempotent, unknown ids are fine.
    let del = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.call(ctl.delete_volume(del("")))),
        Code::InvalidArgument
    );
    c.call(ctl.delete_volume(del("pvc-one"))).unwrap();
    c.call(ctl.delete_volume(del("pvc-one"))).unwrap();
    c.call(ctl.delete_volume(del("never-existed"))).unwrap();
    // After deletion the name is free again, with any size.
    let mut fresh = create_req("pvc-one", 1 << 30);
    fresh.volume_capabilities = vec![block_cap(RWO)];
    c.call(ctl.create_volume(fresh)).unwrap();
}

#[test]
fn controller_lists_pages_validates_expands_and_reports() {
    let (_d, c) = daemon();
    let mut ctl = c.controller.clone();

    let caps = c
        .call(ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}))
        .unwrap();
    use csi::controller_service_capability::rpc::Type as R;
    let have: BTreeSet<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match cap.r#type.as_ref().unwrap() {
            csi::controller_service_capability::Type::Rpc(r) => r.r#type,
        })
        .collect();
    for want in [
        R::CreateDeleteVolume,
        R::ListVolumes,
        R::GetCapacity,
        R::ExpandVolume,
        R::GetVolume,
        R::CreateDeleteSnapshot,
        R::ListSnapshots,
    ] {
        assert!(have.contains(&(want as i32)), "missing {want:?}");
    }
    for absent in [R::PublishUnpublishVolume, R::CloneVolume] {
        assert!(
            !have.contains(&(absent as i32)),
            "{absent:?} is not implemented"
        );
    }
    // What is not advertised answers UNIMPLEMENTED.
    assert_eq!(
        code(c.call(ctl.controller_publish_volume(csi::ControllerPublishVolumeRequest::default()))),
        Code::Unimplemented
    );

    // Pagination over 5 volumes, 2 at a time.
    for i in 0..5 {
        c.call(ctl.create_volume(create_req(&format!("pvc-{i}"), 1 << 20)))
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .call(ctl.list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }))
            .unwrap();
        assert!(page.entries.len() <= 2);
        pages += 1;
        for e in &page.entries {
            seen.push(e.volume.as_ref().unwrap().volume_id.clone());
            let cond = e
                .status
                .as_ref()
                .unwrap()
                .volume_condition
                .as_ref()
                .unwrap();
            assert!(!cond.abnormal, "{}", cond.message);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..5).map(|i| format!("pvc-{i}")).collect::<Vec<_>>());
    let all = c
        .call(ctl.list_volumes(csi::ListVolumesRequest::default()))
        .unwrap();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    assert_eq!(
        code(c.call(ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "not-a-token".into(),
        }))),
        Code::Aborted
    );
    assert_eq!(
        code(c.call(ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        }))),
        Code::InvalidArgument
    );

    // ValidateVolumeCapabilities.
    let val = |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_eq!(
        code(c.call(ctl.validate_volume_capabilities(val("", vec![mount_cap("", RWO)])))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.validate_volume_capabilities(val("pvc-0", vec![])))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.validate_volume_capabilities(val("nope", vec![mount_cap("", RWO)])))),
        Code::NotFound
    );
    let ok = c
        .call(ctl.validate_volume_capabilities(val(
            "pvc-0",
            vec![
                mount_cap("ext4", RWO),
                block_cap(Mode::SingleNodeReaderOnly),
            ],
        )))
        .unwrap();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let multi = c
        .call(ctl.validate_volume_capabilities(val(
            "pvc-0",
            vec![mount_cap("", Mode::MultiNodeReaderOnly)],
        )))
        .unwrap();
    assert!(multi.confirmed.is_none());
    assert!(!multi.message.is_empty());

    // GetCapacity: space for RF 1 here, none for RF 2 (one node), none in another domain.
    let cap = |params: &[(&str, &str)], domain: Option<&str>| csi::GetCapacityRequest {
        volume_capabilities: vec![],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        accessible_topology: domain.map(|d| csi::Topology {
            segments: HashMap::from([("topology.tandem.io/domain".into(), d.into())]),
        }),
    };
    let here = c.call(ctl.get_capacity(cap(&[], Some("east")))).unwrap();
    assert!(here.available_capacity > (7 << 30), "{here:?}");
    assert_eq!(
        c.call(ctl.get_capacity(cap(&[("repl", "2")], None)))
            .unwrap()
            .available_capacity,
        0
    );
    assert_eq!(
        c.call(ctl.get_capacity(cap(&[], Some("west"))))
            .unwrap()
            .available_capacity,
        0
    );
    assert_eq!(
        code(c.call(ctl.get_capacity(cap(&[("bogus", "1")], None)))),
        Code::InvalidArgument
    );

    // ControllerGetVolume.
    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    assert_eq!(
        code(c.call(ctl.controller_get_volume(get("")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.controller_get_volume(get("nope")))),
        Code::NotFound
    );
    let g = c.call(ctl.controller_get_volume(get("pvc-1"))).unwrap();
    assert_eq!(g.volume.unwrap().capacity_bytes, 1 << 20);
    assert!(!g.status.unwrap().volume_condition.unwrap().abnormal);

    // ControllerExpandVolume: required fields, NOT_FOUND, grow, idempotent repeat.
    let exp = |id: &str, bytes: Option<i64>| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: bytes.map(|b| csi::CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(c.call(ctl.controller_expand_volume(exp("", Some(2 << 20))))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.controller_expand_volume(exp("pvc-1", None)))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.controller_expand_volume(exp("nope", Some(2 << 20))))),
        Code::NotFound
    );
    for _ in 0..2 {
        let r = c
            .call(ctl.controller_expand_volume(exp("pvc-1", Some(4 << 20))))
            .unwrap();
        assert_eq!(r.capacity_bytes, 4 << 20);
        assert!(r.node_expansion_required);
    }
    // Asking for less than it has is fine (volumes never shrink).
    let r = c
        .call(ctl.controller_expand_volume(exp("pvc-1", Some(1 << 20))))
        .unwrap();
    assert_eq!(r.capacity_bytes, 4 << 20);
}

#[test]
fn node_reports_topology_and_checks_arguments() {
    let (_d, c) = daemon();
    let mut node = c.node.clone();
    let info = c
        .call(node.node_get_info(csi::NodeGetInfoRequest {}))
        .unwrap();
    assert_eq!(info.node_id, "n1");
    let topo = info.accessible_topology.unwrap().segments;
    assert_eq!(topo["topology.tandem.io/domain"], "east");
    assert_eq!(topo["topology.tandem.io/zone"], "default");
    assert_eq!(topo["topology.tandem.io/node"], "n1");
    let caps = c
        .call(node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}))
        .unwrap();
    use csi::node_service_capability::rpc::Type as R;
    let have: BTreeSet<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match cap.r#type.as_ref().unwrap() {
            csi::node_service_capability::Type::Rpc(r) => r.r#type,
        })
        .collect();
    for want in [R::StageUnstageVolume, R::GetVolumeStats, R::ExpandVolume] {
        assert!(have.contains(&(want as i32)), "missing {want:?}");
    }

    let mut ctl = c.controller.clone();
    c.call(ctl.create_volume(create_req("pvc-n", 64 << 20)))
        .unwrap();
    let stage =
        |id: &str, path: &str, cap: Option<csi::VolumeCapability>| csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: cap,
            ..Default::default()
        };
    let cap = Some(mount_cap("", RWO));
    assert_eq!(
        code(c.call(node.node_stage_volume(stage("", "/tmp/x", cap.clone())))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_stage_volume(stage("pvc-n", "", cap.clone())))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_stage_volume(stage("pvc-n", "/tmp/x", None)))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_stage_volume(stage("nope", "/tmp/x", cap.clone())))),
        Code::NotFound
    );
    assert_eq!(
        code(c.call(node.node_stage_volume(stage(
            "pvc-n",
            "/tmp/x",
            Some(mount_cap("", Mode::MultiNodeMultiWriter))
        )))),
        Code::FailedPrecondition
    );
    let unstage = |id: &str, path: &str| csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };
    assert_eq!(
        code(c.call(node.node_unstage_volume(unstage("", "/tmp/x")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_unstage_volume(unstage("pvc-n", "")))),
        Code::InvalidArgument
    );
    let publish = |id: &str, staging: &str, target: &str, cap: Option<csi::VolumeCapability>| {
        csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: cap,
            ..Default::default()
        }
    };
    assert_eq!(
        code(c.call(node.node_publish_volume(publish("", "/s", "/t", cap.clone())))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_publish_volume(publish("pvc-n", "/s", "", cap.clone())))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_publish_volume(publish("pvc-n", "/s", "/t", None)))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_publish_volume(publish("pvc-n", "", "/t", cap.clone())))),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.call(node.node_publish_volume(publish("nope", "/s", "/t", cap.clone())))),
        Code::NotFound
    );
    let unpublish = |id: &str, target: &str| csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    };
    assert_eq!(
        code(c.call(node.node_unpublish_volume(unpublish("", "/t")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_unpublish_volume(unpublish("pvc-n", "")))),
        Code::InvalidArgument
    );
    // Unpublishing or unstaging what is not there succeeds (idempotent).
    let nowhere = tempfile::tempdir().unwrap();
    let t = nowhere.path().join("target");
    c.call(node.node_unpublish_volume(unpublish("pvc-n", t.to_str().unwrap())))
        .unwrap();
    c.call(node.node_unstage_volume(unstage("pvc-n", nowhere.path().to_str().unwrap())))
        .unwrap();
    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(c.call(node.node_get_volume_stats(stats("", "/t")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_get_volume_stats(stats("pvc-n", "")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_get_volume_stats(stats("nope", "/t")))),
        Code::NotFound
    );
    assert_eq!(
        code(c.call(node.node_get_volume_stats(stats("pvc-n", nowhere.path().to_str().unwrap())))),
        Code::NotFound
    );
    let expand = |id: &str, path: &str| csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.call(node.node_expand_volume(expand("", "/t")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_expand_volume(expand("pvc-n", "")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(node.node_expand_volume(expand("nope", "/t")))),
        Code::NotFound
    );
    // The volume is checked before the path: an unknown volume is NOT_FOUND even at a
    // relative path, and so is a known one at a path it is not staged or published at.
    for (id, path) in [
        ("nope", "relative/t"),
        ("pvc-n", "relative/t"),
        ("pvc-n", nowhere.path().to_str().unwrap()),
    ] {
        assert_eq!(
            code(c.call(node.node_get_volume_stats(stats(id, path)))),
            Code::NotFound,
            "stats {id} {path}"
        );
        assert_eq!(
            code(c.call(node.node_expand_volume(expand(id, path)))),
            Code::NotFound,
            "expand {id} {path}"
        );
    }
}

/// CreateSnapshot, DeleteSnapshot and ListSnapshots as the spec (and csi-sanity) has them:
/// required fields, NOT_FOUND for a missing source, idempotency by name, ALREADY_EXISTS
/// for the name on another source, ready when CreateSnapshot returns, an empty list (not
/// an error) for an unknown id, paging, ABORTED for a bad token, and a delete of an
/// unknown id that succeeds.
#[test]
fn controller_snapshots_follow_the_spec() {
    let (_d, c) = daemon();
    let mut ctl = c.controller.clone();
    c.call(ctl.create_volume(create_req("pvc-a", 16 << 20)))
        .unwrap();
    c.call(ctl.create_volume(create_req("pvc-b", 16 << 20)))
        .unwrap();
    let snap = |name: &str, source: &str| csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.call(ctl.create_snapshot(snap("", "pvc-a")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.create_snapshot(snap("s", "")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.call(ctl.create_snapshot(snap("s", "nope")))),
        Code::NotFound
    );
    let mut bad_param = snap("s", "pvc-a");
    bad_param.parameters.insert("color".into(), "blue".into());
    assert_eq!(
        code(c.call(ctl.create_snapshot(bad_param))),
        Code::InvalidArgument
    );

    // A detached source: the cut is made (the volume attached for it), ready at once.
    let s1 = c
        .call(ctl.create_snapshot(snap("snapshot-1", "pvc-a")))
        .unwrap()
        .snapshot
        .unwrap();
    assert!(s1.ready_to_use, "{s1:?}");
    assert_eq!(s1.source_volume_id, "pvc-a");
    assert_eq!(s1.size_bytes, 16 << 20);
    assert!(!s1.snapshot_id.is_empty());
    assert!(s1.creation_time.as_ref().unwrap().seconds > 0);
    let again = c
        .call(ctl.create_snapshot(snap("snapshot-1", "pvc-a")))
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s1.snapshot_id, "idempotent by name");
    assert_eq!(
        code(c.call(ctl.create_snapshot(snap("snapshot-1", "pvc-b")))),
        Code::AlreadyExists
    );
    // A name longer than a Tandem name is mapped, and still idempotent.
    let long = format!("snapshot-{}", "x".repeat(200));
    let l1 = c
        .call(ctl.create_snapshot(snap(&long, "pvc-b")))
        .unwrap()
        .snapshot
        .unwrap();
    let l2 = c
        .call(ctl.create_snapshot(snap(&long, "pvc-b")))
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(l1.snapshot_id, l2.snapshot_id);

    let list = |r: csi::ListSnapshotsRequest| {
        let mut ctl = c.controller.clone();
        c.call(ctl.list_snapshots(r))
    };
    let all = list(Default::default()).unwrap();
    assert_eq!(all.entries.len(), 2, "{all:?}");
    let by_id = list(csi::ListSnapshotsRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(
        by_id.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        s1.snapshot_id
    );
    let by_source = list(csi::ListSnapshotsRequest {
        source_volume_id: "pvc-b".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(by_source.entries.len(), 1);
    for unknown in [
        csi::ListSnapshotsRequest {
            snapshot_id: "no-such-snapshot".into(),
            ..Default::default()
        },
        csi::ListSnapshotsRequest {
            source_volume_id: "no-such-volume".into(),
            ..Default::default()
        },
    ] {
        assert!(
            list(unknown).unwrap().entries.is_empty(),
            "an empty list, not an error"
        );
    }
    let page1 = list(csi::ListSnapshotsRequest {
        max_entries: 1,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(page1.entries.len(), 1);
    assert!(!page1.next_token.is_empty());
    let page2 = list(csi::ListSnapshotsRequest {
        max_entries: 1,
        starting_token: page1.next_token.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_token.is_empty());
    assert_ne!(page1.entries[0], page2.entries[0]);
    assert_eq!(
        code(list(csi::ListSnapshotsRequest {
            starting_token: "not-a-token".into(),
            ..Default::default()
        })),
        Code::Aborted
    );
    assert_eq!(
        code(list(csi::ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })),
        Code::InvalidArgument
    );

    let del = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.call(ctl.delete_snapshot(del("")))),
        Code::InvalidArgument
    );
    c.call(ctl.delete_snapshot(del("no-such-snapshot")))
        .unwrap();
    c.call(ctl.delete_snapshot(del(&s1.snapshot_id))).unwrap();
    c.call(ctl.delete_snapshot(del(&s1.snapshot_id))).unwrap();
    let left = list(Default::default()).unwrap();
    assert_eq!(left.entries.len(), 1, "{left:?}");
    assert_eq!(
        left.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        l1.snapshot_id
    );
}
