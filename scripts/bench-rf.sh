#!/usr/bin/env bash
# bench-rf.sh: cost of synchronous replication. fio (nbd ioengine) against three volumes of
# one local 3-node tandemd cluster, replication factor 1, 2 and 3, all attached on node 1.
#
# The cluster: three tandemd processes on this machine, 127.0.0.1 only, every listen address
# on its own free port, each node its own --data-dir in one temporary directory (so on the
# same filesystem). Node 1 bootstraps the cluster and prints the join token; nodes 2 and 3
# join it with --join/--token. Default I/O engine (std).
#
# Volumes, all attached on node 1 (so fio always talks to node 1's NBD server):
#   rf1  --repl 1 --nodes <node 1>                 the local store, no coordinator
#   rf2  --repl 2 --nodes <node 1>,<node 2>         local replica + one remote (wire protocol)
#   rf3  --repl 3 --nodes <node 1>,<node 2>,<node 3> local replica + two remote
# The replicated volumes go through the replication coordinator, which fans every write
# out to every in-sync replica (the local one in-process, the others over the data-path
# wire protocol on loopback) and acks when all of them have it. Every replica is checked
# in-sync before the first measured job and again after the last one.
#
# Method (the same as scripts/bench-nbd.sh, see docs/BENCHMARKS.md):
# * Precondition, identical for every volume: one sequential 1 MiB-block write of the whole
#   volume through fio's nbd ioengine (one volume at a time), then the filesystem is synced.
#   Measured writes are overwrites of allocated space.
# * Interleaving: for every round and every workload, each volume runs once; the order of
#   the volumes rotates from round to round. Before every job the script waits SETTLE
#   seconds (so the coordinator of the volume measured before has retired its idle hot
#   regions, a flush plus a raft proposal, before the next job starts; the coordinator
#   retires a region after 5 s without writes) and syncs the filesystem.
# * Latency is fio's total latency (lat = slat + clat, --lat_percentiles=1): with the nbd
#   ioengine libnbd may send a request and read its reply inside fio's submit call.
# * CPU accounting: user + system time of each tandemd process (all threads) from
#   /proc/<pid>/stat before and after each job, and the context switches of all their
#   threads, divided by the I/Os fio completed (scaled by runtime/(runtime+ramp), since fio
#   excludes the ramp from its I/O count). Also recorded: machine-wide busy CPU (percent of
#   all CPUs, from /proc/stat) during each job, which shows whether a job was CPU-bound, and
#   the part of it that was neither tandemd nor fio (kernel writeback, other load).
#
# Workloads (one NBD connection, the same random offset sequence for every volume):
#   randwrite-qd1        4 KiB random write QD1    p50/p99 latency (µs), IOPS
#   randwrite-qd32       4 KiB random write QD32   IOPS
#   seqwrite-1m          1 MiB sequential write QD$SEQ_QD   MB/s (10^6 bytes/s)
#   randwrite-qd1-fsync  4 KiB random write QD1, fio fsync=1 (an NBD flush after every
#                        write)   writes/s and flush latency   (FSYNC=1, the default)
# No FUA; apart from the fsync workload fio sends no flush, so the replicas write to the
# page cache: this measures the software path (and the machine's CPU), not the disk.
#
# Targets (quoted from the issue; the report says whether they are met):
#   RF=3 QD1 p50 latency <= 1.5x RF=1; RF=3 QD32 IOPS >= 0.6x RF=1;
#   RF=3 1 MiB sequential MB/s >= 0.7x RF=1.
#
# Knobs (environment variables):
#   RUNTIME=20        seconds per measured job
#   ROUNDS=3          interleaved rounds
#   SIZE_GIB=1        volume size in GiB
#   RAMP=             fio ramp_time in seconds [default: 2, or 0 when RUNTIME < 10]
#   SEQ_QD=4          queue depth of the 1 MiB sequential write
#   FSYNC=1           also run the fsync-per-write workload (0 to skip)
#   SETTLE=           seconds to wait before every job [default: 7, or 0 when RUNTIME < 10]
#   VERIFY=1          compare the replicas block by block after the run (volume verify)
#   WORKDIR_PARENT=${TMPDIR:-/tmp}   where the temporary directory (the data) is created
#   RESULTS=          directory for fio JSON, logs and summary.md [default: a new directory
#                     under WORKDIR_PARENT, kept after the run]
#   REPORT_ONLY=DIR   measure nothing; regenerate DIR/summary.md from DIR's raw results
#   BUILD=1           run `cargo build --release -p tandem-node` first (0 to use what is built)
#   KEEP=0            1 keeps the temporary data directory
#
# Quick mode for testing: RUNTIME=3 ROUNDS=1 scripts/bench-rf.sh  (about a minute once built,
# a third of it the precondition fill)

set -euo pipefail

RUNTIME=${RUNTIME:-20}
ROUNDS=${ROUNDS:-3}
SIZE_GIB=${SIZE_GIB:-1}
SEQ_QD=${SEQ_QD:-4}
FSYNC=${FSYNC:-1}
VERIFY=${VERIFY:-1}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
WORKDIR_PARENT=${WORKDIR_PARENT:-${TMPDIR:-/tmp}}
if [[ -z "${RAMP:-}" ]]; then
    if (( RUNTIME < 10 )); then RAMP=0; else RAMP=2; fi
fi
if [[ -z "${SETTLE:-}" ]]; then
    if (( RUNTIME < 10 )); then SETTLE=0; else SETTLE=7; fi
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TANDEMD=$REPO/target/release/tandemd
TANDEMCTL=$REPO/target/release/tandemctl
CMDLINE="RUNTIME=$RUNTIME ROUNDS=$ROUNDS SIZE_GIB=$SIZE_GIB RAMP=$RAMP SEQ_QD=$SEQ_QD FSYNC=$FSYNC SETTLE=$SETTLE scripts/bench-rf.sh"

log() { printf '[bench-rf %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Cleanup: every process we start is recorded here and stopped on exit, whatever the exit.
# (Copied from bench-nbd.sh.)
PIDS=()
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    # Background jobs still running (only our own), then the daemons.
    for pid in $(jobs -pr); do
        [[ " ${PIDS[*]} " == *" $pid "* ]] || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$WORK" && -d "$WORK" && "$KEEP" != 1 ]]; then
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# The report: summary.md from the files of a results directory (so it can be regenerated
# from raw data with REPORT_ONLY=<results dir>).
make_report() {
    python3 - "$1" <<'EOF' > "$1/summary.md"
import json, os, statistics, sys

res = sys.argv[1]
params = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(res, "params.txt")) if "=" in l)
runtime, ramp = int(params["runtime"]), int(params["ramp"])
targets = [l.rstrip("\n").split("\t") for l in open(os.path.join(res, "targets.tsv"))]
names = [t[0] for t in targets]
header, *rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(res, "index.tsv"))]
col = {h: i for i, h in enumerate(header)}
NODES = [h[len("cpu_"):] for h in header if h.startswith("cpu_")]

def parse(path, row):
    j = json.load(open(os.path.join(res, path)))["jobs"][0]
    d = j["write"]
    pct = d["lat_ns"].get("percentile", {})
    ios = d["total_ios"]
    scale = runtime / (runtime + ramp)
    r = {
        "iops": d["iops"],
        "mbps": d["bw_bytes"] / 1e6,
        "p50": pct.get("50.000000", 0) / 1000,
        "p99": pct.get("99.000000", 0) / 1000,
        "mean": d["lat_ns"]["mean"] / 1000,
        "clat_p50": d["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000,
        "slat_mean": d.get("slat_ns", {}).get("mean", 0) / 1000,
        # fio's own CPU (the client), percent of the job's wall time.
        "fio_cpu_us": (j["usr_cpu"] + j["sys_cpu"]) / 100 * runtime / ios * 1e6 if ios else 0.0,
        "flush_p50": 0.0,
    }
    s = j.get("sync", {})
    if s.get("total_ios", 0) > 0:
        r["flush_p50"] = s["lat_ns"].get("percentile", {}).get("50.000000", 0) / 1000
    for n in NODES:
        cpu = float(row[col["cpu_" + n]])
        cs = float(row[col["cs_" + n]])
        r["cpu_" + n] = cpu * scale / ios * 1e6 if ios else 0.0
        r["cs_" + n] = cs * scale / ios if ios else 0.0
    # Machine-wide CPU during the job (CPU-seconds over all CPUs): busy share, and the share
    # of busy time that is neither tandemd nor fio (kernel writeback workers, other load).
    if "busy_s" in col:
        busy_s, total_s = float(row[col["busy_s"]]), float(row[col["total_s"]])
        tandem_s = sum(float(row[col["cpu_" + n]]) for n in NODES)
        fio_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * (runtime + ramp)
        r["busy"] = 100 * busy_s / total_s if total_s else float("nan")
        r["other"] = 100 * max(busy_s - tandem_s - fio_s, 0) / total_s if total_s else float("nan")
    else:
        r["busy"] = r["other"] = float("nan")
    r["cpu_all"] = sum(r["cpu_" + n] for n in NODES)
    r["cs_all"] = sum(r["cs_" + n] for n in NODES)
    return r

data, order = {}, []
for row in rows:
    rnd, wl, tgt, path = row[col["round"]], row[col["workload"]], row[col["target"]], row[col["file"]]
    if wl not in order:
        order.append(wl)
    data.setdefault((wl, tgt), {})[int(rnd)] = parse(path, row)

def vals(wl, t, key):
    return [r[key] for r in data.get((wl, t), {}).values()]

def med(wl, t, key):
    v = vals(wl, t, key)
    return statistics.median(v) if v else float("nan")

def span(wl, t, key, fmt):
    xs = vals(wl, t, key)
    return f" [{fmt.format(min(xs))}–{fmt.format(max(xs))}]" if len(xs) > 1 else ""

def paired(wl, t, base, key):
    """Per-round ratios t/base (same round: measured within a few minutes)."""
    a, b = data.get((wl, t), {}), data.get((wl, base), {})
    return [a[r][key] / b[r][key] for r in sorted(a) if r in b and b[r][key]]

def fmt_ratios(xs):
    return ", ".join(f"{x:.2f}" for x in xs)

base = names[0]
out = []
out.append("## Replication factor benchmark: RF 1 / 2 / 3 on one local 3-node cluster\n")
out.append(f"Command: `{params['command']}`\n")
out.append("fio jobs: `" + open(os.path.join(res, "fio-command.txt")).read().strip().replace("\n", "`; `") + "`\n")
out.append("```")
out.append(open(os.path.join(res, "machine.txt")).read().rstrip())
le = os.path.join(res, "load-end.txt")
if os.path.exists(le):
    out.append("load average at end: " + open(le).read().strip())
out.append("```\n")
out.append("Volumes (all attached on node 1; fio talks to node 1's NBD server):\n")
for t in targets:
    out.append(f"- {t[0]}: {t[1]}")
out.append("")
for f, title in (("insync-before.txt", "Replica states before the first job"),
                 ("insync-after.txt", "Replica states after the last job"),
                 ("verify.txt", "volume verify after the run")):
    p = os.path.join(res, f)
    if os.path.exists(p):
        out.append(f"{title}:\n\n```\n{open(p).read().rstrip()}\n```\n")

has = lambda wl: any((wl, t) in data for t in names)
out.append("### Headline (median over rounds; [min–max] over rounds)\n")
cols = []
if has("randwrite-qd1"):
    cols += [("randwrite-qd1", "p50", "QD1 write p50 µs", "{:.1f}"),
             ("randwrite-qd1", "p99", "QD1 write p99 µs", "{:.1f}"),
             ("randwrite-qd1", "iops", "QD1 write IOPS", "{:.0f}")]
if has("randwrite-qd32"):
    cols += [("randwrite-qd32", "iops", "QD32 write IOPS", "{:.0f}")]
if has("seqwrite-1m"):
    cols += [("seqwrite-1m", "mbps", "1 MiB seq write MB/s", "{:.0f}")]
if has("randwrite-qd1-fsync"):
    cols += [("randwrite-qd1-fsync", "iops", "QD1 write+flush per s", "{:.0f}"),
             ("randwrite-qd1-fsync", "flush_p50", "flush p50 µs", "{:.0f}")]
out.append("| volume | " + " | ".join(c[2] for c in cols) + " |")
out.append("|---|" + "---:|" * len(cols))
for t in names:
    cells = []
    for wl, key, _, f in cols:
        if (wl, t) in data:
            cells.append(f.format(med(wl, t, key)) + span(wl, t, key, f))
        else:
            cells.append("-")
    out.append(f"| {t} | " + " | ".join(cells) + " |")
out.append("")

out.append(f"### Ratios to {base} (per round, then the median over rounds)\n")
out.append("Latency ratio: lower is better (1.00 = as fast as RF 1). IOPS and MB/s ratios: higher")
out.append("is better. CPU/IO ratios: how much more tandemd CPU one I/O costs than at RF 1 (all three")
out.append("processes, or node 1 alone: the coordinator node's share).\n")
out.append("| metric | volume | median ratio | per round |")
out.append("|---|---|---:|---|")
ratio_rows = [("randwrite-qd1", "p50", "QD1 write p50 latency"),
              ("randwrite-qd1", "p99", "QD1 write p99 latency"),
              ("randwrite-qd1", "iops", "QD1 write IOPS"),
              ("randwrite-qd32", "iops", "QD32 write IOPS"),
              ("randwrite-qd32", "p50", "QD32 write p50 latency"),
              ("seqwrite-1m", "mbps", "1 MiB sequential MB/s"),
              ("randwrite-qd1-fsync", "iops", "QD1 write+flush per s"),
              ("randwrite-qd1-fsync", "flush_p50", "flush p50 latency"),
              ("randwrite-qd1", "cpu_all", "QD1 write tandemd CPU/IO (3 nodes)"),
              ("randwrite-qd1", "cpu_n1", "QD1 write node 1 CPU/IO"),
              ("randwrite-qd32", "cpu_all", "QD32 write tandemd CPU/IO (3 nodes)"),
              ("randwrite-qd32", "cpu_n1", "QD32 write node 1 CPU/IO"),
              ("seqwrite-1m", "cpu_all", "1 MiB write tandemd CPU/IO (3 nodes)"),
              ("seqwrite-1m", "cpu_n1", "1 MiB write node 1 CPU/IO")]
for wl, key, label in ratio_rows:
    for t in names[1:]:
        p = paired(wl, t, base, key)
        if p:
            out.append(f"| {label} | {t}/{base} | {statistics.median(p):.2f} | {fmt_ratios(p)} |")
out.append("")

out.append("### Targets (quoted from the issue)\n")
tgt = names[-1]
checks = [("randwrite-qd1", "p50", "RF=3 QD1 write p50 latency at most 1.5x RF=1", lambda x: x <= 1.5, "≤ 1.50"),
          ("randwrite-qd32", "iops", "RF=3 QD32 write IOPS at least 60% of RF=1", lambda x: x >= 0.6, "≥ 0.60"),
          ("seqwrite-1m", "mbps", "RF=3 1 MiB sequential MB/s at least 0.7x RF=1", lambda x: x >= 0.7, "≥ 0.70")]
for wl, key, label, ok, need in checks:
    p = paired(wl, tgt, base, key)
    if not p:
        continue
    m = statistics.median(p)
    k = sum(ok(x) for x in p)
    out.append(f"- {label}: ratio {m:.2f} (needs {need}): **{'met' if ok(m) else 'NOT met'}**"
               f" ({k} of {len(p)} rounds within the target; per round {fmt_ratios(p)})")
out.append("")

out.append("### Where the CPU goes (median over rounds, per I/O fio completed)\n")
out.append("CPU µs/IO: user + system time of each tandemd process (all threads) during the job.")
out.append("node 1 runs the NBD server and the coordinator (and the local replica); nodes 2 and 3")
out.append("only serve replica frames. fio µs: fio's own user + system CPU. ctx sw/IO: context switches")
out.append("of all tandemd threads. busy %: machine-wide non-idle CPU time during the job, percent of")
out.append("all CPUs; other %: the part of it that is neither tandemd nor fio (kernel writeback")
out.append("workers, softirqs charged elsewhere, and any other load on the machine).\n")
out.append("| workload | volume | node 1 µs | node 2 µs | node 3 µs | tandemd total µs | fio µs | ctx sw/IO (n1, n2, n3) | busy % | other % |")
out.append("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
for wl in order:
    for t in names:
        if (wl, t) not in data:
            continue
        cs = ", ".join(f"{med(wl, t, 'cs_' + n):.1f}" for n in NODES)
        out.append(f"| {wl} | {t} | " + " | ".join(f"{med(wl, t, 'cpu_' + n):.1f}" for n in NODES)
                   + f" | {med(wl, t, 'cpu_all'):.1f} | {med(wl, t, 'fio_cpu_us'):.1f} | {cs} | {med(wl, t, 'busy'):.0f} | {med(wl, t, 'other'):.0f} |")
out.append("")

out.append("### Per-round detail (in the order the jobs ran)\n")
out.append("| round | workload | volume | IOPS | MB/s | lat p50 µs | lat p99 µs | clat p50 µs | slat mean µs | flush p50 µs | tandemd CPU µs/IO | ctx sw/IO | busy % | other % |")
out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for row in rows:
    rnd, wl, t = row[col["round"]], row[col["workload"]], row[col["target"]]
    r = data[(wl, t)][int(rnd)]
    out.append(f"| {rnd} | {wl} | {t} | {r['iops']:.0f} | {r['mbps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f}"
               f" | {r['clat_p50']:.1f} | {r['slat_mean']:.1f} | {r['flush_p50']:.0f}"
               f" | {r['cpu_all']:.1f} | {r['cs_all']:.1f} | {r['busy']:.0f} | {r['other']:.0f} |")
out.append("")
print("\n".join(out))
EOF
    cat "$1/summary.md"
}

if [[ -n "${REPORT_ONLY:-}" ]]; then
    make_report "$REPORT_ONLY"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Tools. (Copied from bench-nbd.sh.)
as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

fio_has_nbd() { command -v fio >/dev/null && fio --enghelp 2>&1 | grep -qw nbd; }
if ! fio_has_nbd; then
    log "fio with the nbd ioengine is missing; installing fio with apt-get"
    timeout 300 as_root apt-get update
    timeout 600 as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y fio
    fio_has_nbd || die "fio --enghelp does not list the nbd ioengine"
fi
command -v python3 >/dev/null || die "python3 is required to parse JSON"

if [[ "$BUILD" == 1 ]]; then
    log "building release binaries (cargo build --release -p tandem-node)"
    (cd "$REPO" && timeout 1800 cargo build --release -p tandem-node >&2)
fi
[[ -x "$TANDEMD" && -x "$TANDEMCTL" ]] || die "missing $TANDEMD or $TANDEMCTL (build with BUILD=1)"

# ---------------------------------------------------------------------------------------------
# Work directory, results directory, machine info.
mkdir -p "$WORKDIR_PARENT"
WORK=$(mktemp -d "$WORKDIR_PARENT/tandem-bench-rf.XXXXXX")
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$WORKDIR_PARENT/tandem-bench-rf-results-$STAMP}
mkdir -p "$RESULTS"
log "data in $WORK; results in $RESULTS"

FS_TYPE=$(findmnt -n -o FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
FS_SOURCE=$(findmnt -n -o SOURCE -T "$WORK" 2>/dev/null || echo "?")
FS_OPTS=$(findmnt -n -o OPTIONS -T "$WORK" 2>/dev/null || echo "?")
CPU_MODEL=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
MEM_TOTAL=$(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    GIT_REV="$GIT_REV (working tree modified)"
fi
cat > "$RESULTS/machine.txt" <<EOF
date: $(date -u +%Y-%m-%dT%H:%M:%SZ)
command: $CMDLINE
nproc: $(nproc)
cpu: ${CPU_MODEL:-?}
memory: ${MEM_TOTAL:-?}
kernel: $(uname -r)
filesystem of the data directory: $FS_TYPE on $FS_SOURCE ($FS_OPTS)
data directory: $WORK
fio: $(fio --version)
tandem: git $GIT_REV
load average at start: $(cut -d' ' -f1-3 /proc/loadavg)
EOF

cat > "$RESULTS/params.txt" <<EOF
command=$CMDLINE
runtime=$RUNTIME
ramp=$RAMP
size_gib=$SIZE_GIB
EOF

# Free TCP ports on 127.0.0.1 (all bound at once, so they are distinct). (From bench-nbd.sh.)
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------------------------------------
# The cluster.
# Listen-address flags of this tandemd build (not the --advertise-* ones, which are not binds).
mapfile -t LISTEN_FLAGS < <("$TANDEMD" --help | grep -oE -- '--[a-z-]+-addr\b' \
    | grep -v -- '^--advertise-' | sort -u)
for f in --admin-addr --nbd-addr --data-addr; do
    [[ " ${LISTEN_FLAGS[*]} " == *" $f "* ]] || die "tandemd --help lists no $f"
done

declare -a NODE_PID NODE_ADMIN NODE_NBD NODE_NAME
CTL1=()     # tandemctl against node 1
TOKEN=""

# start_node N [--join ADDR --token TOKEN]: starts node N with its own data directory and a
# free port for every listen address.
start_node() {
    local n=$1; shift
    local dir=$WORK/node$n flag port i
    mkdir -p "$dir"
    local -a ports addr_args=()
    read -r -a ports < <(free_ports "${#LISTEN_FLAGS[@]}")
    for i in "${!LISTEN_FLAGS[@]}"; do
        flag=${LISTEN_FLAGS[$i]} port=${ports[$i]}
        addr_args+=("$flag" "127.0.0.1:$port")
        case $flag in
            --admin-addr) NODE_ADMIN[$n]=127.0.0.1:$port ;;
            --nbd-addr) NODE_NBD[$n]=127.0.0.1:$port ;;
        esac
    done
    log "starting node $n (admin ${NODE_ADMIN[$n]}, NBD ${NODE_NBD[$n]})"
    "$TANDEMD" --data-dir "$dir/data" "${addr_args[@]}" --log warn "$@" \
        >"$RESULTS/node$n.log" 2>&1 &
    NODE_PID[$n]=$!
    PIDS+=("${NODE_PID[$n]}")
    local ctl=("$TANDEMCTL" --endpoint "http://${NODE_ADMIN[$n]}") ok=0
    for _ in $(seq 1 300); do
        kill -0 "${NODE_PID[$n]}" 2>/dev/null || { cat "$RESULTS/node$n.log" >&2; die "node $n exited"; }
        if grep -q 'ready' "$RESULTS/node$n.log" && timeout 5 "${ctl[@]}" status >/dev/null 2>&1; then
            ok=1; break
        fi
        sleep 0.1
    done
    [[ $ok == 1 ]] || { cat "$RESULTS/node$n.log" >&2; die "node $n did not become ready in 30 s"; }
}

# Nodes in `cluster list` (JSON) whose health is online.
online_nodes() {
    timeout 10 "${CTL1[@]}" -j cluster list 2>/dev/null | python3 -c '
import json, sys
try:
    print(sum(1 for n in json.load(sys.stdin) if n.get("health", "online") == "online"))
except Exception:
    print(0)'
}

wait_nodes() {
    local want=$1
    for _ in $(seq 1 120); do
        [[ "$(online_nodes)" -ge $want ]] && return 0
        sleep 0.5
    done
    timeout 10 "${CTL1[@]}" cluster list >&2 || true
    die "the cluster does not show $want online nodes after 60 s"
}

start_node 1
CTL1=("$TANDEMCTL" --endpoint "http://${NODE_ADMIN[1]}")
TOKEN=$(sed -n 's/^ *join token: *//p' "$RESULTS/node1.log" | head -1)
[[ -n "$TOKEN" ]] || die "node 1 printed no join token"
wait_nodes 1
for n in 2 3; do
    start_node "$n" --join "${NODE_ADMIN[1]}" --token "$TOKEN"
    wait_nodes "$n"
done
timeout 10 "${CTL1[@]}" -j cluster list > "$RESULTS/cluster.json"
# Node names, by admin address (names are generated by each node).
for n in 1 2 3; do
    NODE_NAME[$n]=$(python3 - "$RESULTS/cluster.json" "${NODE_ADMIN[$n]}" <<'EOF'
import json, sys
print(next(x["name"] for x in json.load(open(sys.argv[1])) if x["admin_addr"] == sys.argv[2]))
EOF
)
    [[ -n "${NODE_NAME[$n]}" ]] || die "node $n (${NODE_ADMIN[$n]}) is not in cluster list"
done
ENGINE=$(sed -n 's/^ *io engine: *//p' "$RESULTS/node1.log" | head -1)
log "cluster up: ${NODE_NAME[1]} ${NODE_NAME[2]} ${NODE_NAME[3]} (io engine ${ENGINE:-?})"
echo "tandemd io engine: ${ENGINE:-?} (default; no --io-engine flag)" >> "$RESULTS/machine.txt"

# ---------------------------------------------------------------------------------------------
# Volumes: rfN with N replicas, pinned so that node 1 always holds one; all attached on node 1.
TARGETS=(rf1 rf2 rf3)
declare -A URI REPL
: > "$RESULTS/targets.tsv"
for rf in 1 2 3; do
    v=rf$rf
    nodes=${NODE_NAME[1]}
    (( rf >= 2 )) && nodes+=",${NODE_NAME[2]}"
    (( rf >= 3 )) && nodes+=",${NODE_NAME[3]}"
    timeout 30 "${CTL1[@]}" volume create "$v" --size "${SIZE_GIB}GiB" --repl "$rf" --nodes "$nodes" >&2
    timeout 60 "${CTL1[@]}" volume attach "$v" >&2
    URI[$v]="nbd://${NODE_NBD[1]}/$v"
    REPL[$v]=$rf
    case $rf in
        1) desc="--repl 1 on node 1: the local store, no coordinator" ;;
        2) desc="--repl 2 on nodes 1, 2: coordinator, local replica + 1 remote over the wire protocol" ;;
        3) desc="--repl 3 on nodes 1, 2, 3: coordinator, local replica + 2 remote over the wire protocol" ;;
    esac
    printf '%s\t%s\n' "$v" "$desc" >> "$RESULTS/targets.tsv"
done

# check_in_sync FILE: every volume has N replicas, all in-sync, one of them on node 1.
# Waits up to 60 s (a fresh volume's replicas may still be opening); dies otherwise.
check_in_sync() {
    local out=$1 ok v
    for _ in $(seq 1 120); do
        ok=1
        : > "$out"
        for v in "${TARGETS[@]}"; do
            timeout 10 "${CTL1[@]}" -j volume inspect "$v" > "$RESULTS/inspect-$v.json" 2>/dev/null || { ok=0; continue; }
            python3 - "$RESULTS/inspect-$v.json" "${REPL[$v]}" "${NODE_NAME[1]}" >> "$out" <<'EOF' || ok=0
import json, sys
v = json.load(open(sys.argv[1]))
want, node1 = int(sys.argv[2]), sys.argv[3]
reps = v["replicas"]
states = ", ".join(f"{r['node_id']} {r['state']}" for r in reps)
print(f"{v['name']}: repl {v['repl']}, attached on {v['attached_node']}, generation {v['generation']}: {states}")
good = (len(reps) == want and all(r["state"] == "in-sync" for r in reps)
        and any(r["node_id"] == node1 for r in reps) and v["attached_node"] == node1)
sys.exit(0 if good else 1)
EOF
        done
        [[ $ok == 1 ]] && return 0
        sleep 0.5
    done
    cat "$out" >&2
    die "not every replica is in-sync (see $out)"
}

# CPU time (user+system, all threads) of a process, in clock ticks. (From bench-nbd.sh.)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Context switches (voluntary + involuntary) of every thread of a process: "tid count" lines.
# A delta is taken per thread (tokio's blocking-pool threads come and go), so a thread that
# exits during a job loses its switches (an undercount) but never makes the delta negative.
ctx_snapshot() {
    awk 'FNR == 1 {n = split(FILENAME, p, "/"); tid = p[n - 1]} /ctxt_switches/ {s[tid] += $2}
         END {for (t in s) print t, s[t]}' /proc/"$1"/task/*/status 2>/dev/null || true
}
ctx_delta() {  # ctx_delta BEFORE_FILE AFTER_FILE
    awk 'NR == FNR {b[$1] = $2; next} {d += $2 - (($1 in b) ? b[$1] : 0)} END {print d + 0}' "$1" "$2"
}
CLK_TCK=$(getconf CLK_TCK)
# Machine-wide CPU counters from /proc/stat: "busy idle" in clock ticks (idle includes iowait).
cpu_busy_idle() {
    awk '/^cpu / {idle = $5 + $6; t = 0; for (i = 2; i <= 9; i++) t += $i; print t - idle, idle}' /proc/stat
}

sync_fs() { timeout 120 sync -f "$WORK" || log "warning: sync timed out"; }

# ---------------------------------------------------------------------------------------------
# Precondition: sequential fill of every volume, one at a time, identical for each.
for v in "${TARGETS[@]}"; do
    log "precondition: sequential 1 MiB fill of ${SIZE_GIB} GiB on $v"
    timeout 900 fio --name="fill-$v" --ioengine=nbd --uri="${URI[$v]}" --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_GIB}G" --output-format=json \
        --output="$RESULTS/fill-$v.json" >/dev/null 2>"$RESULTS/fill-$v.err" \
        || { cat "$RESULTS/fill-$v.err" >&2; die "fill of $v failed"; }
done
sync_fs
check_in_sync "$RESULTS/insync-before.txt"
log "all replicas in-sync: $(tr '\n' ';' < "$RESULTS/insync-before.txt")"

# ---------------------------------------------------------------------------------------------
# Measured jobs.
# name:rw:bs:iodepth:extra fio args
WORKLOADS=("randwrite-qd1:randwrite:4k:1:" "randwrite-qd32:randwrite:4k:32:" "seqwrite-1m:write:1M:$SEQ_QD:")
if [[ "$FSYNC" == 1 ]]; then
    WORKLOADS+=("randwrite-qd1-fsync:randwrite:4k:1:--fsync=1")
fi
FIO_COMMON=(--size="${SIZE_GIB}G" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
    --numjobs=1 --lat_percentiles=1 --percentile_list=50:90:99:99.9 --output-format=json)
: > "$RESULTS/fio-command.txt"
for w in "${WORKLOADS[@]}"; do
    IFS=: read -r wname rw bs qd extra <<<"$w"
    echo "fio --name=$wname --ioengine=nbd --uri=nbd://127.0.0.1:PORT/rfN --rw=$rw --bs=$bs --iodepth=$qd${extra:+ $extra} ${FIO_COMMON[*]}" \
        >> "$RESULTS/fio-command.txt"
done

INDEX=$RESULTS/index.tsv
printf 'round\tworkload\ttarget\tfile\tcpu_n1\tcpu_n2\tcpu_n3\tcs_n1\tcs_n2\tcs_n3\tbusy_s\ttotal_s\n' > "$INDEX"
n_targets=${#TARGETS[@]}
total=$((ROUNDS * ${#WORKLOADS[@]} * n_targets))
done_jobs=0
for round in $(seq 1 "$ROUNDS"); do
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r wname rw bs qd extra <<<"$w"
        for i in $(seq 0 $((n_targets - 1))); do
            # Rotate the order of the volumes from round to round.
            t=${TARGETS[$(((i + round - 1) % n_targets))]}
            (( SETTLE > 0 )) && sleep "$SETTLE"
            sync_fs
            out=$RESULTS/r$round-$wname-$t.json
            done_jobs=$((done_jobs + 1))
            log "[$done_jobs/$total] round $round $wname $t"
            c0=()
            for n in 1 2 3; do
                c0+=("$(cpu_ticks "${NODE_PID[$n]}")")
                ctx_snapshot "${NODE_PID[$n]}" > "$WORK/ctx-n$n.before"
            done
            read -r b0 i0 < <(cpu_busy_idle)
            # shellcheck disable=SC2086  # $extra is empty or one fio flag
            timeout $((RUNTIME + RAMP + 120)) fio --name="$wname" --ioengine=nbd --uri="${URI[$t]}" \
                --rw="$rw" --bs="$bs" --iodepth="$qd" $extra "${FIO_COMMON[@]}" --output="$out" \
                >/dev/null 2>"$out.err" || { cat "$out.err" >&2; die "fio failed: $wname on $t"; }
            read -r b1 i1 < <(cpu_busy_idle)
            line="$round\t$wname\t$t\t$(basename "$out")"
            cpus="" css=""
            for n in 1 2 3; do
                cpus+="\t$(python3 -c "print(($(cpu_ticks "${NODE_PID[$n]}") - ${c0[$((n - 1))]}) / $CLK_TCK)")"
                ctx_snapshot "${NODE_PID[$n]}" > "$WORK/ctx-n$n.after"
                css+="\t$(ctx_delta "$WORK/ctx-n$n.before" "$WORK/ctx-n$n.after")"
            done
            busy=$(python3 -c "print(($b1 - $b0) / $CLK_TCK, (($b1 - $b0) + ($i1 - $i0)) / $CLK_TCK, sep='\t')")
            printf '%b\n' "$line$cpus$css\t$busy" >> "$INDEX"
        done
    done
done

# ---------------------------------------------------------------------------------------------
# After the run: still in sync? Replicas identical?
check_in_sync "$RESULTS/insync-after.txt"
if [[ "$VERIFY" == 1 ]]; then
    : > "$RESULTS/verify.txt"
    for v in rf2 rf3; do
        timeout 600 "${CTL1[@]}" -j volume verify "$v" > "$RESULTS/verify-$v.json" \
            || die "volume verify $v failed"
        python3 - "$RESULTS/verify-$v.json" >> "$RESULTS/verify.txt" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['volume']}: {r['blocks_compared']} blocks compared on {', '.join(r['in_sync_nodes'])}: "
      f"{r['mismatched_blocks']} mismatched, errors {r['errors'] or 'none'}")
EOF
    done
fi

# ---------------------------------------------------------------------------------------------
# Report.
cut -d' ' -f1-3 /proc/loadavg > "$RESULTS/load-end.txt"
make_report "$RESULTS"
log "raw fio JSON, logs and summary.md in $RESULTS"
