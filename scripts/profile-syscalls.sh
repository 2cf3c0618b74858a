#!/usr/bin/env bash
# profile-syscalls.sh: syscalls and futex calls per replicated 4 KiB write (issue 11).
#
#   REPL=1|2|3 scripts/profile-syscalls.sh [TANDEMD] [WRITES] [QD]
#   BS=1M RW=write REPL=2 scripts/profile-syscalls.sh ...   another fio block size and pattern
#   PERF=1 REPL=2 scripts/profile-syscalls.sh ...  CPU profile instead: each node's top
#                                                  symbols by self time (perf record)
#
# Starts REPL tandemd nodes on loopback (fresh data directories), creates and fills a
# 256 MiB volume with that replication factor, attaches it on node 1, then runs WRITES
# (default 20000) 4 KiB random writes with fio's nbd engine at queue depth QD (default 1)
# while `strace -c -f` counts every daemon's syscalls. Prints, per node and in total, the
# syscalls per write, the futex calls per write, and each node's five most frequent
# syscalls. strace slows the daemons down, so only the counts mean anything, not time.
# Needs fio and strace (scripts/test.sh installs fio; apt-get install strace).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/tandemd}
WRITES=${2:-20000}
QD=${3:-1}
BS=${BS:-4k}
RW=${RW:-randwrite}
REPL=${REPL:-2}
CTL=$ROOT/target/release/tandemctl
[[ -x $CTL && -x $BIN ]] || { echo "build first: cargo build --release -p tandem-node" >&2; exit 1; }
for t in fio strace; do command -v $t >/dev/null || { echo "$t is missing" >&2; exit 1; }; done
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
for n in $(seq "$REPL"); do
    base=$((7900 + 20 * n))
    join=()
    if [[ $n -gt 1 ]]; then
        token=$("$CTL" --endpoint 127.0.0.1:7920 -j cluster token show | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
        join=(--join 127.0.0.1:7920 --token "$token")
    fi
    "$BIN" --data-dir "$WORK/n$n" --admin-addr 127.0.0.1:$base --nbd-addr 127.0.0.1:$((base + 1)) \
        --metrics-addr 127.0.0.1:$((base + 2)) --data-addr 127.0.0.1:$((base + 3)) --pool-size 2GiB \
        --log warn "${join[@]}" >"$WORK/n$n.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do "$CTL" --endpoint 127.0.0.1:$base status >/dev/null 2>&1 && break; sleep 0.1; done
done
for _ in $(seq 100); do
    "$CTL" --endpoint 127.0.0.1:7920 volume create v --size 256MiB --repl "$REPL" >/dev/null 2>&1 && break
    sleep 0.2
done
"$CTL" --endpoint 127.0.0.1:7920 volume attach v >/dev/null
URI=nbd://127.0.0.1:7921/v
fio --name=fill --ioengine=nbd --uri=$URI --rw=write --bs=1M --size=256M --iodepth=4 >/dev/null 2>&1
TRACERS=()
for i in "${!PIDS[@]}"; do
    if [[ -n ${PERF:-} ]]; then
        perf record -q -F 999 -p "${PIDS[$i]}" -o "$WORK/perf$((i + 1)).data" 2>/dev/null &
    else
        strace -c -f -q -p "${PIDS[$i]}" -o "$WORK/strace$((i + 1)).txt" &
    fi
    TRACERS+=($!)
done
sleep 1
fio --name=w --ioengine=nbd --uri=$URI --rw="$RW" --bs="$BS" --size=256M --iodepth="$QD" \
    --number_ios="$WRITES" --output-format=json 2>/dev/null | sed -n '/^{/,$p' >"$WORK/f.json"
for t in "${TRACERS[@]}"; do kill -INT "$t" 2>/dev/null || true; done
for t in "${TRACERS[@]}"; do wait "$t" 2>/dev/null || true; done
if [[ -n ${PERF:-} ]]; then
    for n in $(seq "$REPL"); do
        echo "node $n: top symbols by self time"
        perf report -q -i "$WORK/perf$n.data" --no-children --sort symbol --percent-limit 1.5 --stdio 2>/dev/null |
            grep -v '^$' | head -25
    done
    exit 0
fi
python3 - "$WORK" "$REPL" "$QD" <<'PY'
import json, re, sys
work, repl, qd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ios = json.load(open(f"{work}/f.json"))["jobs"][0]["write"]["total_ios"]
total = futex = 0
print(f"RF {repl}, QD{qd}: {ios} writes")
for n in range(1, repl + 1):
    calls = {}
    for line in open(f"{work}/strace{n}.txt"):
        f = line.split()
        if len(f) >= 5 and f[-1] not in ("total", "syscall") and re.match(r"^[0-9.]+$", f[0]):
            calls[f[-1]] = int(f[3])
    s = sum(calls.values())
    total += s
    futex += calls.get("futex", 0)
    top = ", ".join(f"{k} {v / ios:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:5])
    print(f"  node {n}: {s / ios:6.2f} syscalls/write ({top})")
print(f"  all nodes: {total / ios:.2f} syscalls/write, {futex / ios:.2f} futex/write")
PY
