#!/usr/bin/env python3
"""Offline schema validation of the Tandem deployment manifests.

    python3 deploy/validate.py                 # every manifest under deploy/
    python3 deploy/validate.py FILE...         # only these files
    python3 deploy/validate.py -k 1.31 FILE    # against other Kubernetes versions

Every YAML document is checked against the schemas of its kind, with unknown fields
rejected:
  - built-in kinds against the Kubernetes OpenAPI schemas bundled in the
    kubernetes-validate package (no network), for the oldest and the newest Kubernetes
    version we support (KUBERNETES_VERSIONS);
  - SecurityContextConstraints (OpenShift) against deploy/schemas/, taken from the CRD in
    the openshift/api repository (source noted in the schema's $comment), with jsonschema;
  - a kind with no schema is an error (kubernetes-validate's own CLI only warns).

On top of the schemas, project rules the API server cannot know: StorageClasses of
csi.tandem.io use only parameters the driver accepts, with valid values; images carry a
pinned tag; namespaced objects name the tandem-system namespace; the kustomizations list
every manifest (kustomization.yaml files are not Kubernetes objects and are only checked
for that).

Exit status: 0 when every document passed, 1 when any failed, 3 when the validator tools
are missing (scripts/test.sh installs them).
"""

import argparse
import json
import os
import sys

DEPLOY = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(DEPLOY, "schemas")
NAMESPACE = "tandem-system"
DRIVER = "csi.tandem.io"

# Oldest supported (OpenShift 4.16 ships Kubernetes 1.29) and the newest the installed
# kubernetes-validate bundles ("latest").
KUBERNETES_VERSIONS = ["1.29", "latest"]

# Kinds validated against a schema under deploy/schemas/ instead of kubernetes-validate.
EXTRA_SCHEMAS = {
    ("security.openshift.io/v1", "SecurityContextConstraints"):
        "securitycontextconstraints-security-v1.json",
}

CLUSTER_SCOPED = {
    "Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "SecurityContextConstraints", "PriorityClass",
}

# StorageClass parameters accepted by the driver (docs/csi.md), with their valid values.
SC_ENUMS = {
    "repl": {"1", "2", "3"},
    "priority_io": {"high", "medium", "low"},
    "fs": {"ext4", "xfs"},
    "csi.storage.k8s.io/fstype": {"ext4", "xfs"},
}
SC_LISTS = {"zones", "domains", "async_domains"}

try:
    import yaml
    import jsonschema
    import referencing
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError as e:  # pragma: no cover - depends on the machine
    print(
        "deploy/validate.py: the validator tools are missing (%s); scripts/test.sh "
        "installs them: pip3 install kubernetes-validate" % e,
        file=sys.stderr,
    )
    sys.exit(3)


def manifest_files():
    """Every YAML file under deploy/, kustomization files apart."""
    found, kustomizations = [], []
    for root, dirs, files in os.walk(DEPLOY):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, name)
            if name in ("kustomization.yaml", "kustomization.yml"):
                kustomizations.append(path)
            else:
                found.append(path)
    return found, kustomizations


def rel(path):
    path = os.path.abspath(path)
    top = os.path.dirname(DEPLOY)
    if path.startswith(DEPLOY + os.sep):
        return os.path.relpath(path, top)
    return path


def resolve_versions(requested):
    latest = kv_utils.latest_version()
    out = []
    for v in requested:
        v = latest if v == "latest" else v
        if kv_utils.major_minor(v) not in [kv_utils.major_minor(x) for x in kv_utils.all_versions()]:
            raise SystemExit(
                "deploy/validate.py: kubernetes-validate %s has no schemas for Kubernetes %s "
                "(it has %s)" % (kubernetes_validate.__version__, v,
                                 ", ".join(kv_utils.all_versions())))
        if v not in out:
            out.append(v)
    return out


def error_path(e):
    return ".".join(str(p) for p in e.absolute_path) or "(document)"


def validate_extra(doc, schema_file, version):
    """A kind with a schema under deploy/schemas/; its metadata against ObjectMeta."""
    with open(os.path.join(SCHEMAS, schema_file)) as f:
        schema = json.load(f)
    errors = []
    validator = jsonschema.Draft202012Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.append("%s: %s" % (error_path(e), e.message))
    # ObjectMeta from the bundled Kubernetes schemas.
    schema_dir = "kubernetes-json-schema/v%s-local-strict" % kv_utils.major_minor(version)
    for v in kv_utils.all_versions():
        if kv_utils.major_minor(v) == kv_utils.major_minor(version):
            schema_dir = "kubernetes-json-schema/v%s-local-strict" % v
    meta = kv_utils.schema_contents(schema_dir + "/objectmeta-meta-v1.json", version)
    defs = kv_utils.schema_contents(schema_dir + "/_definitions.json", version)
    registry = referencing.Registry().with_resources([
        (meta.get("$id", "objectmeta"), referencing.Resource.from_contents(meta)),
        (defs.get("$id", "_definitions.json"), referencing.Resource.from_contents(defs)),
    ])
    meta_validator = jsonschema.Draft202012Validator(meta, registry=registry)
    for e in meta_validator.iter_errors(doc.get("metadata") or {}):
        where = ".".join(str(p) for p in e.absolute_path)
        errors.append("metadata%s: %s" % ("." + where if where else "", e.message))
    return errors


def validate_schema(doc, versions):
    errors = []
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in EXTRA_SCHEMAS:
        return validate_extra(doc, EXTRA_SCHEMAS[key], versions[-1])
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append("Kubernetes %s: %s: %s" % (e.version, error_path(e), e.message))
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append("no schema for kind %s (apiVersion %s) in Kubernetes %s: add one "
                          "under deploy/schemas/ or fix the kind" % (e.kind, e.api_version,
                                                                     e.version))
            break
    return errors


def containers_of(doc):
    spec = doc.get("spec") or {}
    pod = ((spec.get("template") or {}).get("spec")) or {}
    return (pod.get("initContainers") or []) + (pod.get("containers") or [])


def project_rules(doc):
    errors = []
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        errors.append("metadata.name: missing")
    if kind not in CLUSTER_SCOPED and meta.get("namespace") != NAMESPACE:
        errors.append("metadata.namespace: a namespaced %s must be in %s, not %r"
                      % (kind, NAMESPACE, meta.get("namespace")))
    for c in containers_of(doc):
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            errors.append("container %s: image %r must carry a pinned tag"
                          % (c.get("name"), image))
    if kind == "StorageClass" and doc.get("provisioner") == DRIVER:
        for k, v in (doc.get("parameters") or {}).items():
            if k in SC_ENUMS:
                if v not in SC_ENUMS[k]:
                    errors.append("parameters.%s: %r is not one of %s"
                                  % (k, v, sorted(SC_ENUMS[k])))
            elif k in SC_LISTS:
                items = v.split(",")
                if not all(i.strip() and i == i.strip() for i in items):
                    errors.append("parameters.%s: %r must be a comma list of names" % (k, v))
            elif not k.startswith("csi.storage.k8s.io/"):
                errors.append("parameters.%s: not a parameter of %s (the driver refuses it "
                              "with INVALID_ARGUMENT)" % (k, DRIVER))
    return errors


def load_documents(path):
    with open(path) as f:
        text = f.read()
    docs = []
    for i, doc in enumerate(yaml.safe_load_all(text)):
        if doc is None:
            continue
        docs.append((i + 1, doc))
    return docs


def check_kustomizations(kustomizations, manifests):
    """Each kustomization's resources exist; together they reach every manifest."""
    errors = []
    listed = set()
    for k in kustomizations:
        base = os.path.dirname(k)
        with open(k) as f:
            data = yaml.safe_load(f) or {}
        for entry in data.get("resources") or []:
            target = os.path.normpath(os.path.join(base, entry))
            if os.path.isdir(target):
                if not any(os.path.exists(os.path.join(target, n))
                           for n in ("kustomization.yaml", "kustomization.yml")):
                    errors.append("%s: resource %s is a directory without a kustomization"
                                  % (rel(k), entry))
            elif not os.path.isfile(target):
                errors.append("%s: resource %s does not exist" % (rel(k), entry))
            else:
                listed.add(target)
    for m in manifests:
        if os.path.normpath(m) not in listed:
            errors.append("%s: not listed in any kustomization.yaml" % rel(m))
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", "--kubernetes-version", action="append",
                        help="Kubernetes version(s) to validate against (default: %s)"
                        % " and ".join(KUBERNETES_VERSIONS))
    parser.add_argument("files", nargs="*",
                        help="manifests to check (default: every YAML file under deploy/)")
    args = parser.parse_args()
    versions = resolve_versions(args.kubernetes_version or KUBERNETES_VERSIONS)

    failures = []
    if args.files:
        files, kustomizations = args.files, []
    else:
        files, kustomizations = manifest_files()
        for e in check_kustomizations(kustomizations, files):
            failures.append(e)
    count = 0
    for path in files:
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError) as e:
            failures.append("%s: cannot read as YAML: %s" % (rel(path), e))
            continue
        if not docs:
            failures.append("%s: no YAML documents" % rel(path))
        for index, doc in docs:
            count += 1
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                failures.append("%s: document %d: not a Kubernetes object (no kind/apiVersion)"
                                % (rel(path), index))
                continue
            what = "%s: document %d (%s %s)" % (rel(path), index, doc["kind"],
                                                (doc.get("metadata") or {}).get("name", "?"))
            errors = validate_schema(doc, versions) + project_rules(doc)
            for e in errors:
                failures.append("%s: %s" % (what, e))
            if not errors:
                print("ok   %s" % what)

    shown = ", ".join(kv_utils.latest_version() if v == "latest" else v for v in versions)
    if failures:
        for f in failures:
            print("FAIL %s" % f)
        print("deploy/validate.py: FAILED: %d problem(s) in %d document(s) of %d file(s) "
              "(Kubernetes %s)" % (len(failures), count, len(files), shown))
        return 1
    print("deploy/validate.py: OK: %d document(s) in %d file(s) valid (Kubernetes %s)"
          % (count, len(files), shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
