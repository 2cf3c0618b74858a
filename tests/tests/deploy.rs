//! The Kubernetes/OpenShift manifests under `deploy/` against the Kubernetes and
//! OpenShift schemas, offline, through the one entry point `python3 deploy/validate.py`
//! (kubernetes-validate's bundled OpenAPI schemas with unknown fields rejected, and the
//! SecurityContextConstraints schema in `deploy/schemas/`). The negative cases prove the
//! validator really rejects broken manifests, so a validator that accepts everything
//! cannot pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const INSTALL_HINT: &str = "the manifest validator needs python3 with the kubernetes-validate \
     package (which brings jsonschema and PyYAML); scripts/test.sh installs it \
     (pip3 install kubernetes-validate)";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Fails the test (never skips it) when the tools are missing.
fn require_validator() {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate, jsonschema, referencing, yaml",
        ])
        .output();
    match probe {
        Err(e) => panic!("cannot run python3 ({e}): {INSTALL_HINT}"),
        Ok(o) if !o.status.success() => panic!("{INSTALL_HINT}\n{}", text(&o)),
        Ok(_) => {}
    }
}

fn validate(files: &[&Path]) -> Output {
    require_validator();
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("deploy/validate.py"))
        .args(files)
        .current_dir(&root)
        .output()
        .expect("run deploy/validate.py");
    if out.status.code() == Some(3) {
        panic!("{INSTALL_HINT}\n{}", text(&out));
    }
    out
}

#[test]
fn every_manifest_passes_offline_schema_validation() {
    let out = validate(&[]);
    let log = text(&out);
    assert!(
        out.status.success(),
        "deploy/ manifests fail validation:\n{log}"
    );
    // The walk found the manifests, and each kind went through a schema.
    for expected in [
        "deploy/namespace.yaml: document 1 (Namespace tandem-system)",
        "(CSIDriver csi.tandem.io)",
        "(DaemonSet tandem-node)",
        "(Deployment tandem-controller)",
        "(ClusterRole tandem-external-provisioner)",
        "(Role tandem-controller-leader-election)",
        "(StorageClass tandem-repl3-high)",
        "(StorageClass tandem-metro)",
        "deploy/openshift/scc.yaml: document 1 (SecurityContextConstraints tandem-node)",
        "(SecurityContextConstraints tandem-controller)",
        "deploy/validate.py: OK:",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
}

/// Each broken manifest, alone, must be refused with a message naming the problem.
#[test]
fn broken_manifests_are_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: &[(&str, &str, &str)] = &[
        (
            "replicas-not-integer.yaml",
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: tandem-system}
spec:
  replicas: "two"
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers: [{name: c, image: "registry.k8s.io/pause:3.10"}]
"#,
            "spec.replicas: 'two' is not of type 'integer'",
        ),
        (
            "unknown-field.yaml",
            r#"apiVersion: apps/v1
kind: DaemonSet
metadata: {name: broken, namespace: tandem-system}
spec:
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers:
        - name: c
          image: "registry.k8s.io/pause:3.10"
          mountPropagation: Bidirectional
"#,
            "'mountPropagation' was unexpected",
        ),
        (
            "csidriver-bad-type.yaml",
            r#"apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {name: csi.tandem.io}
spec:
  attachRequired: "no"
"#,
            "spec.attachRequired: 'no' is not of type 'boolean'",
        ),
        (
            "scc-bad.yaml",
            r#"apiVersion: security.openshift.io/v1
kind: SecurityContextConstraints
metadata: {name: broken}
priority: null
allowPrivilegedContainer: true
allowHostDirVolumePlugin: true
allowHostNetwork: "yes"
allowHostPorts: true
allowHostIPC: false
allowHostPID: false
allowedCapabilities: ["*"]
defaultAddCapabilities: null
requiredDropCapabilities: null
readOnlyRootFilesystem: false
volumes: ["*"]
"#,
            "allowHostNetwork: 'yes' is not of type 'boolean'",
        ),
        (
            "scc-missing-required.yaml",
            r#"apiVersion: security.openshift.io/v1
kind: SecurityContextConstraints
metadata: {name: broken}
allowPrivilegedContainer: true
hostNetwork: true
"#,
            "'priority' is a required property",
        ),
        (
            "unknown-kind.yaml",
            r#"apiVersion: example.io/v1
kind: NoSuchKind
metadata: {name: broken, namespace: tandem-system}
"#,
            "no schema for kind NoSuchKind",
        ),
        (
            "storageclass-px-parameter.yaml",
            r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: broken}
provisioner: csi.tandem.io
parameters:
  repl: "3"
  io_profile: "db"
"#,
            "parameters.io_profile: not a parameter of csi.tandem.io",
        ),
        (
            "storageclass-bad-repl.yaml",
            r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: broken}
provisioner: csi.tandem.io
parameters:
  repl: "4"
"#,
            "parameters.repl: '4' is not one of",
        ),
        (
            "unpinned-image.yaml",
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: tandem-system}
spec:
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers: [{name: c, image: "quay.io/tandem/tandemd:latest"}]
"#,
            "must carry a pinned tag",
        ),
        (
            "not-yaml.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [unclosed\n",
            "cannot read as YAML",
        ),
    ];
    for (name, body, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).expect("write broken manifest");
        let out = validate(&[&path]);
        let log = text(&out);
        assert!(
            !out.status.success(),
            "{name}: the validator accepted a broken manifest:\n{log}"
        );
        assert_eq!(out.status.code(), Some(1), "{name}: exit status\n{log}");
        assert!(
            log.contains(expected),
            "{name}: expected {expected:?} in:\n{log}"
        );
    }
}

/// A valid file next to a broken one: the run fails, and the valid one is still reported
/// as passing (every document is checked, not just up to the first failure).
#[test]
fn one_broken_document_fails_the_whole_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("two-docs.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: fine, namespace: tandem-system}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: tandem-system}
spec:
  ports: [{port: "9010"}]
"#,
    )
    .expect("write manifest");
    let out = validate(&[&path]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("ok   ") && log.contains("(ServiceAccount fine)"),
        "{log}"
    );
    assert!(
        log.contains("FAIL ") && log.contains("(Service broken)"),
        "{log}"
    );
}
