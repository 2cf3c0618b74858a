#!/usr/bin/env bash
# bench-snapshots.sh: 4 KiB write and read latency with 0, 1, 10 and 60 snapshots, and the
# pause of a cut under load (issue 12).
#
#   scripts/bench-snapshots.sh [TANDEMD] [SIZE_MIB] [RUNTIME_S]     e.g. ... target/release/tandemd 256 5
#
# Starts 3 tandemd nodes on loopback, creates one RF 3 volume of SIZE_MIB (default 256),
# fills it, then for each snapshot count (0, 1, 10, 60; 64 is the most a volume keeps):
# takes snapshots up to that count, each after a second of 4 KiB random writes at QD8 (so
# every layer holds a share of the blocks), then measures with fio over NBD 4 KiB random
# writes and random reads at QD1 for RUNTIME_S each (p50 and p99, fio's total latency),
# and the pause of one more cut taken while fio writes at QD8 (what `volume snapshot
# create` reports; that snapshot is deleted again). Needs fio.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/tandemd}
MIB=${2:-256}
RUNTIME=${3:-5}
CTL=$ROOT/target/release/tandemctl
command -v fio >/dev/null || { echo "fio is missing" >&2; exit 1; }
W=$(mktemp -d)
P=()
cleanup() { for p in "${P[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
node() { # N ADMIN NBD METRICS DATA [join args...]
    local n=$1 admin=$2 nbd=$3 metrics=$4 data=$5
    shift 5
    "$BIN" --data-dir "$W/n$n" --admin-addr "127.0.0.1:$admin" --nbd-addr "127.0.0.1:$nbd" \
        --metrics-addr "127.0.0.1:$metrics" --data-addr "127.0.0.1:$data" --pool-size 8GiB \
        --log warn "$@" >"$W/n$n.log" 2>&1 &
    P+=($!)
}
ctl() { "$CTL" --endpoint 127.0.0.1:7950 "$@"; }
node 1 7950 7951 7952 7953
for _ in $(seq 100); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
T=$(ctl -j cluster token show | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
node 2 7960 7961 7962 7963 --join 127.0.0.1:7950 --token "$T"
node 3 7970 7971 7972 7973 --join 127.0.0.1:7950 --token "$T"
for _ in $(seq 100); do
    [[ $(ctl -j cluster list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') == 3 ]] && break
    sleep 0.2
done
for _ in $(seq 50); do ctl volume create v --size "${MIB}MiB" --repl 3 >/dev/null 2>&1 && break; sleep 0.2; done
ctl volume attach v >/dev/null
URI=nbd://127.0.0.1:7951/v
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --size="${MIB}M" --iodepth=4 >/dev/null 2>&1
job() { # RW QD SECONDS -> fio JSON on stdout
    fio --name=j --ioengine=nbd --uri="$URI" --rw="$1" --bs=4k --size="${MIB}M" --iodepth="$2" \
        --time_based --runtime="$3" --randrepeat=0 --lat_percentiles=1 --output-format=json 2>/dev/null | sed -n '/^{/,$p'
}
lat() { # RW -> "p50 p99" in µs
    job "$1" 1 "$RUNTIME" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
side = j["write"] if j["write"]["total_ios"] else j["read"]
p = side["lat_ns"]["percentile"]
print("%.1f %.1f" % (p["50.000000"] / 1e3, p["99.000000"] / 1e3))'
}
count=0
printf '%-10s %14s %14s %14s %14s %12s\n' snapshots "write p50 µs" "write p99 µs" "read p50 µs" "read p99 µs" "pause ms"
for target in 0 1 10 60; do
    while ((count < target)); do
        job randwrite 8 1 >/dev/null
        ctl volume snapshot create v "s$count" >/dev/null
        count=$((count + 1))
    done
    read -r wp50 wp99 <<<"$(lat randwrite)"
    read -r rp50 rp99 <<<"$(lat randread)"
    job randwrite 8 4 >/dev/null &
    F=$!
    sleep 1.5
    pause=$(ctl -j volume snapshot create v "pause$target" | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["pause_seconds"] * 1e3))')
    wait "$F"
    ctl volume snapshot delete v "pause$target" >/dev/null
    printf '%-10s %14s %14s %14s %14s %12s\n' "$target" "$wp50" "$wp99" "$rp50" "$rp99" "$pause"
done
