#!/usr/bin/env bash
# bench-ab.sh: A/B of two tandemd builds on the replicated write path, interleaved.
#
#   scripts/bench-ab.sh OLD_TANDEMD NEW_TANDEMD [ROUNDS]
#   REPL=1 scripts/bench-ab.sh ...     the RF 1 local fast path (one node) instead
#   REPL=3 scripts/bench-ab.sh ...     RF 3 on three nodes
#
# For each round and each binary (alternating), starts a REPL-node cluster on loopback
# (fresh data directories under a temporary directory; 2 nodes by default), creates and
# fills a 1 GiB volume of that RF, and runs fio's nbd engine: 4 KiB random write at QD1
# and QD32, 10 s each. Prints p50 latency, IOPS and the CPU of every tandemd process per
# write (from /proc/PID/stat). A binary may be a wrapper script that execs tandemd with
# extra flags (e.g. --worker-threads 1).
# Needs fio (scripts/test.sh installs it). Everything it starts is stopped on exit.
set -euo pipefail
OLD=${1:?usage: bench-ab.sh OLD_TANDEMD NEW_TANDEMD [ROUNDS]}
NEW=${2:?usage: bench-ab.sh OLD_TANDEMD NEW_TANDEMD [ROUNDS]}
ROUNDS=${3:-3}
REPL=${REPL:-2}
CTL=$(cd "$(dirname "$0")/.." && pwd)/target/release/tandemctl
[[ -x $CTL ]] || { echo "build tandemctl first: cargo build --release -p tandem-node" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio is missing: scripts/test.sh installs it" >&2; exit 1; }
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

run_one() { # label binary
    local label=$1 bin=$2 d="$WORK/$1-$RANDOM"
    mkdir -p "$d"
    "$bin" --data-dir "$d/n1" --admin-addr 127.0.0.1:7910 --nbd-addr 127.0.0.1:7909 \
        --metrics-addr 127.0.0.1:7911 --data-addr 127.0.0.1:7920 --pool-size 4GiB --log warn >"$d/n1.log" 2>&1 &
    local p1=$!; PIDS+=("$p1")
    local nodes=("$p1")
    for _ in $(seq 100); do "$CTL" --endpoint 127.0.0.1:7910 status >/dev/null 2>&1 && break; sleep 0.1; done
    local token
    if [[ $REPL -gt 1 ]]; then
        token=$("$CTL" --endpoint 127.0.0.1:7910 -j cluster token show | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
        for n in $(seq 2 "$REPL"); do
            local base=$((7910 + 20 * (n - 1)))
            "$bin" --data-dir "$d/n$n" --admin-addr 127.0.0.1:$base --nbd-addr 127.0.0.1:$((base + 9)) \
                --metrics-addr 127.0.0.1:$((base + 1)) --data-addr 127.0.0.1:$((base + 10)) --pool-size 4GiB --log warn \
                --join 127.0.0.1:7910 --token "$token" >"$d/n$n.log" 2>&1 &
            nodes+=("$!"); PIDS+=("$!")
        done
    fi
    for _ in $(seq 100); do
        "$CTL" --endpoint 127.0.0.1:7910 volume create v --size 1GiB --repl "$REPL" >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$CTL" --endpoint 127.0.0.1:7910 volume attach v >/dev/null
    local uri=nbd://127.0.0.1:7909/v
    fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1M --size=1G --iodepth=4 >/dev/null 2>&1
    for qd in 1 32; do
        local before=0 after=0 p
        for p in "${nodes[@]}"; do before=$((before + $(ticks "$p"))); done
        fio --name=w --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --size=1G --iodepth=$qd \
            --time_based --runtime=10 --lat_percentiles=1 --output-format=json 2>/dev/null |
            sed -n '/^{/,$p' >"$d/f.json"
        for p in "${nodes[@]}"; do after=$((after + $(ticks "$p"))); done
        local cpu=$(( after - before ))
        python3 - "$d/f.json" "$cpu" "$label" "$qd" <<'PY'
import json, os, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
hz = os.sysconf("SC_CLK_TCK")
cpu_us = int(sys.argv[2]) * 1e6 / hz / max(j["total_ios"], 1)
print(f"{sys.argv[3]:4} QD{sys.argv[4]:<3} p50 {j['lat_ns']['percentile']['50.000000']/1000:7.1f} us  "
      f"IOPS {j['iops']:8.0f}  CPU {cpu_us:6.1f} us/write")
PY
    done
    kill -9 "${nodes[@]}" 2>/dev/null || true
    wait "${nodes[@]}" 2>/dev/null || true
}

for r in $(seq "$ROUNDS"); do
    echo "round $r"
    if (( r % 2 )); then run_one old "$OLD"; run_one new "$NEW"; else run_one new "$NEW"; run_one old "$OLD"; fi
done
