#!/usr/bin/env bash
# The full test suite, from a fresh machine: installs what the tests need, builds, tests.
#
#   scripts/test.sh
#
# Installs (when missing): qemu-utils (qemu-io, qemu-img, qemu-nbd), libnbd-bin (nbdinfo),
# fio. Runs every test of the workspace: unit tests (both I/O engines), the multi-process
# tests against real tandemd processes, and compiles the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}"
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The multi-process tests spawn target/debug/tandemd and tandemctl.
cargo build --workspace --bins
# Heavy multi-process tests share 2 cores; two test threads keep them from starving.
cargo test --workspace -- --test-threads=2
# Benchmarks must keep compiling.
cargo bench -p tandem-bench --no-run
