#!/usr/bin/env bash
# profile-volumes.sh: one volume against many, on the same 2-node RF 2 cluster (issue 11).
#
#   scripts/profile-volumes.sh [TANDEMD] [VOLUMES] [SIZE_MIB]      e.g. ... target/release/tandemd 16 16
#
# Starts 2 tandemd nodes on loopback, creates VOLUMES RF 2 volumes of SIZE_MIB each
# (default 16 and 16), fills them, then runs fio's 4 KiB random writes at QD32 per volume
# for 8 s: first on volume 0 alone, then on all of them at once. Prints IOPS, the CPU of
# both daemons and of fio per write, and each daemon's top symbols by self time
# (`perf record`) during each phase. Needs fio and perf.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/tandemd}
VOLS=${2:-16}
MIB=${3:-16}
CTL=$ROOT/target/release/tandemctl
for t in fio perf; do command -v $t >/dev/null || { echo "$t is missing" >&2; exit 1; }; done
W=$(mktemp -d)
P=()
cleanup() { for p in "${P[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
"$BIN" --data-dir "$W/n1" --admin-addr 127.0.0.1:7910 --nbd-addr 127.0.0.1:7909 --metrics-addr 127.0.0.1:7911 \
    --data-addr 127.0.0.1:7920 --pool-size 8GiB --log warn >"$W/n1.log" 2>&1 &
P+=($!)
for _ in $(seq 100); do "$CTL" --endpoint 127.0.0.1:7910 status >/dev/null 2>&1 && break; sleep 0.1; done
T=$("$CTL" --endpoint 127.0.0.1:7910 -j cluster token show | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$BIN" --data-dir "$W/n2" --admin-addr 127.0.0.1:7930 --nbd-addr 127.0.0.1:7939 --metrics-addr 127.0.0.1:7931 \
    --data-addr 127.0.0.1:7940 --pool-size 8GiB --log warn --join 127.0.0.1:7910 --token "$T" >"$W/n2.log" 2>&1 &
P+=($!)
for i in $(seq 0 $((VOLS - 1))); do
    for _ in $(seq 50); do
        "$CTL" --endpoint 127.0.0.1:7910 volume create "s$i" --size "${MIB}MiB" --repl 2 >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$CTL" --endpoint 127.0.0.1:7910 volume attach "s$i" >/dev/null
    fio --name=f --ioengine=nbd --uri="nbd://127.0.0.1:7909/s$i" --rw=write --bs=1M --size="${MIB}M" --iodepth=4 >/dev/null 2>&1
done
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
for n in 1 "$VOLS"; do
    args=()
    for i in $(seq 0 $((n - 1))); do args+=(--name="j$i" --uri="nbd://127.0.0.1:7909/s$i"); done
    a=$(($(ticks "${P[0]}") + $(ticks "${P[1]}")))
    perf record -q -F 499 -p "${P[0]}" -o "$W/p1.$n" 2>/dev/null & S1=$!
    perf record -q -F 499 -p "${P[1]}" -o "$W/p2.$n" 2>/dev/null & S2=$!
    fio --ioengine=nbd --rw=randwrite --bs=4k --size="${MIB}M" --iodepth=32 --time_based --runtime=8 \
        --group_reporting --output-format=json "${args[@]}" 2>/dev/null | sed -n '/^{/,$p' >"$W/f.json"
    b=$(($(ticks "${P[0]}") + $(ticks "${P[1]}")))
    kill -INT "$S1" "$S2"; wait "$S1" "$S2" 2>/dev/null || true
    python3 - "$W/f.json" $((b - a)) "$n" <<'PY'
import json, os, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
w, n = j["write"], int(sys.argv[3])
ios = max(w["total_ios"], 1)
daemons = int(sys.argv[2]) * 1e6 / os.sysconf("SC_CLK_TCK") / ios
# With group_reporting, fio's usr/sys CPU is the mean over its n jobs.
fio = (j["usr_cpu"] + j["sys_cpu"]) / 100 * 8e6 * n / ios
print(f"volumes {n:>2}: IOPS {w['iops']:8.0f}  daemons {daemons:6.1f} us/write  fio {fio:6.1f} us/write")
PY
    for k in 1 2; do
        echo "  node $k top symbols:"
        perf report -q -i "$W/p$k.$n" --no-children --sort symbol --percent-limit 2.5 --stdio 2>/dev/null |
            grep -v '^$' | cut -c1-80 | head -8
    done
done
