#!/usr/bin/env bash
# The full test suite, from a fresh machine: installs what the tests need, builds, tests.
#
#   scripts/test.sh
#
# Installs (when missing): qemu-utils (qemu-io, qemu-img, qemu-nbd), libnbd-bin (nbdinfo),
# fio, fuse3, xfsprogs and e2fsprogs (the CSI node tests mount ext4 and xfs over FUSE and
# loop devices), iproute2 (the site tests put each site in its own network namespace),
# python3-pip, and the kubernetes-validate package from PyPI (offline schemas for the
# deploy/ manifests). Runs every test of the workspace: unit tests (both I/O engines), the
# multi-process tests against real tandemd processes (bench/tests/quick.rs runs
# `tandem-bench run --quick` on a tiny matrix, about 35 s), and compiles the benchmarks (test profile).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v ip >/dev/null || need+=(iproute2)
{ command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; } || need+=(python3-pip)
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}"
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# deploy/ manifest validation (tests/tests/deploy.rs): offline Kubernetes/OpenShift schemas.
if ! python3 -c 'import kubernetes_validate, jsonschema, referencing, yaml' 2>/dev/null; then
    echo "test.sh: installing kubernetes-validate"
    python3 -m pip install -q 'kubernetes-validate==1.37.0' \
        || python3 -m pip install -q --break-system-packages 'kubernetes-validate==1.37.0'
fi

# The multi-process tests spawn target/debug/tandemd and tandemctl.
cargo build --workspace --bins
# Heavy multi-process tests share 2 cores; two test threads keep them from starving.
cargo test --workspace -- --test-threads=2
# Benchmarks must keep compiling. `cargo build --benches` builds them in the test profile,
# on the debug build's dependencies; `cargo bench --no-run` would build every dependency
# again with optimizations (about ten minutes on 2 cores) only to throw it away.
cargo build -p tandem-bench --benches
