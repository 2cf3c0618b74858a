#!/usr/bin/env bash
# bench-nbd.sh: fio (nbd ioengine) against tandemd and against qemu-nbd, in the same run.
#
# Both servers run on this machine, listen on 127.0.0.1 only, and keep their data in one
# temporary directory (so on the same filesystem). Jobs are interleaved: for every round and
# every workload each target runs once, and the order of the targets rotates from round to
# round, so machine drift (other load, page-cache writeback, thermal) hits every target alike.
#
# Precondition (identical for every target): the export (sparse at first) is filled once
# with a sequential 1 MiB write of its whole size, then the filesystem is synced. Every
# measured write is therefore an overwrite of allocated space, and every read hits written
# data. Before every measured job the filesystem is synced again, so no job inherits dirty
# pages from the previous one.
#
# Workloads (fio --ioengine=nbd, one connection, 4 KiB, random offsets over the whole export,
# the same offset sequence for every target since fio's randrepeat is on):
#   randwrite QD1   latency p50/p99 (µs) and IOPS
#   randwrite QD32  IOPS (and latency p50/p99)
#   randread  QD1   latency p50/p99 and IOPS      (READS=1, the default)
#   randread  QD32  IOPS                          (READS=1)
# Latency is fio's total latency per request (lat = slat + clat, --lat_percentiles=1): with
# the nbd ioengine, libnbd may send a request and read its reply inside fio's submit call,
# so part of the time shows up as slat and clat alone under-reports (clat is kept in the
# per-round table for reference).
# The writes carry no FUA and fio sends no flush, so both servers write to the page cache.
#
# Knobs (environment variables):
#   RUNTIME=20        seconds per measured job
#   ROUNDS=3          interleaved rounds
#   ENGINES="uring std"  tandemd --io-engine values to measure, each its own daemon (auto too)
#   SIZE_GIB=1        export size in GiB
#   RAMP=             fio ramp_time in seconds [default: 2, or 0 when RUNTIME < 10]
#   READS=1           also run the random-read workloads (0 to skip)
#   QEMU_AIO=threads  qemu-nbd --aio mode (threads, native, io_uring)
#   QEMU=1            include qemu-nbd (0 to measure tandemd alone)
#   WORKDIR_PARENT=${TMPDIR:-/tmp}   where the temporary directory (the data) is created
#   RESULTS=          directory for fio JSON, logs and summary.md [default: a new directory
#                     under WORKDIR_PARENT, kept after the run]
#   REPORT_ONLY=DIR   measure nothing; regenerate DIR/summary.md from DIR's raw results
#   BUILD=1           run `cargo build --release -p tandem-node` first (0 to use what is built)
#   KEEP=0            1 keeps the temporary data directory
#
# Quick mode for testing: RUNTIME=3 ROUNDS=1 scripts/bench-nbd.sh  (under a minute)

set -euo pipefail

RUNTIME=${RUNTIME:-20}
ROUNDS=${ROUNDS:-3}
ENGINES=${ENGINES:-"uring std"}
SIZE_GIB=${SIZE_GIB:-1}
READS=${READS:-1}
QEMU_AIO=${QEMU_AIO:-threads}
QEMU=${QEMU:-1}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
WORKDIR_PARENT=${WORKDIR_PARENT:-${TMPDIR:-/tmp}}
if [[ -z "${RAMP:-}" ]]; then
    if (( RUNTIME < 10 )); then RAMP=0; else RAMP=2; fi
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TANDEMD=$REPO/target/release/tandemd
TANDEMCTL=$REPO/target/release/tandemctl
VOLUME=bench
CMDLINE="RUNTIME=$RUNTIME ROUNDS=$ROUNDS ENGINES=\"$ENGINES\" SIZE_GIB=$SIZE_GIB RAMP=$RAMP READS=$READS QEMU_AIO=$QEMU_AIO QEMU=$QEMU scripts/bench-nbd.sh"

log() { printf '[bench-nbd %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Cleanup: every process we start is recorded here and stopped on exit, whatever the exit.
PIDS=()
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    # Background fio fills still running (only our own jobs), then the servers.
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
rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(res, "index.tsv"))]
names = [t for t, _ in targets]

def parse(path, cpu_s):
    j = json.load(open(path if os.path.isabs(path) else os.path.join(res, path)))["jobs"][0]
    d = j["write"] if j["write"]["total_ios"] > 0 else j["read"]
    # Total latency (submission + completion). With the nbd ioengine part of a request's
    # time can land in fio's "slat" (libnbd may send the request and read its reply inside
    # the submit call), so clat alone under-reports and is kept only for reference.
    key = "lat_ns" if "percentile" in d.get("lat_ns", {}) else "clat_ns"
    pct = d[key].get("percentile", {})
    ios = d["total_ios"]
    return {
        "metric": "lat" if key == "lat_ns" else "clat",
        "iops": d["iops"],
        "p50": pct.get("50.000000", 0) / 1000,
        "p99": pct.get("99.000000", 0) / 1000,
        "mean": d[key]["mean"] / 1000,
        "clat_p50": d["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000,
        "slat_mean": d.get("slat_ns", {}).get("mean", 0) / 1000,
        # Server CPU per I/O. fio's total_ios excludes the ramp and the CPU figure does
        # not, so scale the CPU by runtime/(runtime+ramp).
        "cpu_us": cpu_s * runtime / (runtime + ramp) / ios * 1e6 if ios else 0.0,
    }

data, order = {}, []
for rnd, wl, tgt, path, cpu in rows:
    if wl not in order:
        order.append(wl)
    r = parse(path, float(cpu))
    r["round"] = int(rnd)
    data.setdefault((wl, tgt), {})[int(rnd)] = r

def med(wl, t, key):
    return statistics.median(r[key] for r in data[(wl, t)].values())

def span(wl, t, key, fmt):
    xs = [r[key] for r in data[(wl, t)].values()]
    return f" [{fmt.format(min(xs))}–{fmt.format(max(xs))}]" if len(xs) > 1 else ""

def paired(wl, t, key):
    """Per-round ratios target/qemu-nbd (same round = measured minutes apart)."""
    a, q = data.get((wl, t), {}), data.get((wl, "qemu-nbd"), {})
    return [a[r][key] / q[r][key] for r in sorted(a) if r in q and q[r][key]]

out = []
out.append("## NBD benchmark: tandemd vs qemu-nbd (fio nbd ioengine)\n")
out.append(f"Command: `{params['command']}`\n")
out.append("fio job: `" + open(os.path.join(res, "fio-command.txt")).read().strip() + "`\n")
out.append(f"Precondition: each export (a sparse {params['size_gib']} GiB file) filled once with a")
out.append("sequential 1 MiB write of its whole size, then synced, so measured writes are")
out.append("overwrites and reads hit written data. The filesystem is synced before every job;")
out.append("the order of the targets rotates from round to round.\n")
out.append("```")
out.append(open(os.path.join(res, "machine.txt")).read().rstrip())
le = os.path.join(res, "load-end.txt")
if os.path.exists(le):
    out.append("load average at end: " + open(le).read().strip())
out.append("```\n")

metrics = {r["metric"] for d in data.values() for r in d.values()}
lat = "lat" if metrics == {"lat"} else "clat"
out.append("### Absolute figures (median over rounds; [min–max] over rounds)\n")
if lat == "lat":
    out.append("Latency is fio's total latency (`lat`: submission + completion) of each 4 KiB request.\n")
else:
    out.append("Latency is fio's completion latency (`clat`); this run predates `--lat_percentiles`.\n")
out.append(f"| workload | target | IOPS | {lat} p50 µs | {lat} p99 µs | {lat} mean µs | server CPU µs/IO |")
out.append("|---|---|---:|---:|---:|---:|---:|")
for wl in order:
    for t in names:
        if (wl, t) in data:
            out.append(
                f"| {wl} | {t} | {med(wl, t, 'iops'):.0f}{span(wl, t, 'iops', '{:.0f}')}"
                f" | {med(wl, t, 'p50'):.1f}{span(wl, t, 'p50', '{:.1f}')}"
                f" | {med(wl, t, 'p99'):.1f} | {med(wl, t, 'mean'):.1f} | {med(wl, t, 'cpu_us'):.1f} |")
out.append("")

if "qemu-nbd" in names:
    out.append("### Ratios tandem / qemu-nbd\n")
    out.append("Each ratio is computed per round (the two jobs ran minutes apart), then the median")
    out.append("over rounds is taken. Latency ratio ≤ 1.00 and IOPS ratio ≥ 1.00 mean tandem is at")
    out.append("least as fast.\n")
    out.append("| workload | target | p50 latency ratio | per round | p99 latency ratio | IOPS ratio | per round |")
    out.append("|---|---|---:|---|---:|---:|---|")
    for wl in order:
        for t in names:
            if t == "qemu-nbd" or not paired(wl, t, "iops"):
                continue
            p50, p99, iops = paired(wl, t, "p50"), paired(wl, t, "p99"), paired(wl, t, "iops")
            out.append(
                f"| {wl} | {t} | {statistics.median(p50):.2f} | {', '.join(f'{x:.2f}' for x in p50)}"
                f" | {statistics.median(p99):.2f} | {statistics.median(iops):.2f}"
                f" | {', '.join(f'{x:.2f}' for x in iops)} |")
    out.append("")
    out.append("### Target: at least as fast as qemu-nbd at p50 QD1 write latency and at QD32 write IOPS\n")
    for t in names:
        if t == "qemu-nbd":
            continue
        v = []
        p = paired("randwrite-qd1", t, "p50")
        if p:
            m = statistics.median(p)
            k = sum(x <= 1.0 for x in p)
            v.append(f"QD1 write p50 ratio {m:.2f}, {'met' if m <= 1.0 else 'NOT met'} ({k} of {len(p)} rounds at or below 1.00)")
        p = paired("randwrite-qd32", t, "iops")
        if p:
            m = statistics.median(p)
            k = sum(x >= 1.0 for x in p)
            v.append(f"QD32 write IOPS ratio {m:.2f}, {'met' if m >= 1.0 else 'NOT met'} ({k} of {len(p)} rounds at or above 1.00)")
        out.append(f"- {t}: " + "; ".join(v))
    out.append("")

out.append("### Per-round detail (in the order the jobs ran)\n")
out.append(f"| round | workload | target | IOPS | {lat} p50 µs | {lat} p99 µs | clat p50 µs | slat mean µs | server CPU µs/IO |")
out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
for rnd, wl, tgt, _, _ in rows:
    r = data[(wl, tgt)][int(rnd)]
    out.append(f"| {rnd} | {wl} | {tgt} | {r['iops']:.0f} | {r['p50']:.1f} | {r['p99']:.1f}"
               f" | {r['clat_p50']:.1f} | {r['slat_mean']:.1f} | {r['cpu_us']:.1f} |")
out.append("")
out.append("Targets:\n")
for t, desc in targets:
    out.append(f"- {t}: {desc}")
print("\n".join(out))
EOF
    cat "$1/summary.md"
}

if [[ -n "${REPORT_ONLY:-}" ]]; then
    make_report "$REPORT_ONLY"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Tools.
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
if [[ "$QEMU" == 1 ]] && ! command -v qemu-nbd >/dev/null; then
    log "qemu-nbd is missing; installing qemu-utils with apt-get"
    timeout 300 as_root apt-get update
    timeout 600 as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-utils
fi
command -v python3 >/dev/null || die "python3 is required to parse fio's JSON"

if [[ "$BUILD" == 1 ]]; then
    log "building release binaries (cargo build --release -p tandem-node)"
    (cd "$REPO" && timeout 1800 cargo build --release -p tandem-node >&2)
fi
[[ -x "$TANDEMD" && -x "$TANDEMCTL" ]] || die "missing $TANDEMD or $TANDEMCTL (build with BUILD=1)"

# ---------------------------------------------------------------------------------------------
# Work directory, results directory, machine info.
mkdir -p "$WORKDIR_PARENT"
WORK=$(mktemp -d "$WORKDIR_PARENT/tandem-bench-nbd.XXXXXX")
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$WORKDIR_PARENT/tandem-bench-nbd-results-$STAMP}
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
qemu-nbd: $(if [[ "$QEMU" == 1 ]]; then qemu-nbd --version | head -1; else echo "not used"; fi)
tandem: git $GIT_REV
load average at start: $(cut -d' ' -f1-3 /proc/loadavg)
EOF

cat > "$RESULTS/params.txt" <<EOF
command=$CMDLINE
runtime=$RUNTIME
ramp=$RAMP
size_gib=$SIZE_GIB
EOF

# Free TCP ports on 127.0.0.1 (all bound at once, so they are distinct).
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
# Targets. For each: NAME, URI, PID (for CPU accounting).
TARGETS=()
declare -A URI PID_OF ENGINE_OF

start_tandem() {
    local engine=$1 name="tandem-$1"
    local dir=$WORK/$name admin="" nbd="" flag port i
    mkdir -p "$dir"
    # Every listen address tandemd has (admin, NBD, metrics, and any newer one such as the
    # replication data path) gets its own free port on 127.0.0.1, so that several daemons
    # (one per engine) and other users of the machine never collide on a default port.
    local -a ports addr_args=()
    read -r -a ports < <(free_ports "${#LISTEN_FLAGS[@]}")
    for i in "${!LISTEN_FLAGS[@]}"; do
        flag=${LISTEN_FLAGS[$i]} port=${ports[$i]}
        addr_args+=("$flag" "127.0.0.1:$port")
        case $flag in
            --admin-addr) admin=$port ;;
            --nbd-addr) nbd=$port ;;
        esac
    done
    [[ -n "$admin" && -n "$nbd" ]] || die "tandemd --help lists no --admin-addr/--nbd-addr"
    log "starting tandemd --io-engine $engine (admin $admin, NBD $nbd)"
    "$TANDEMD" --data-dir "$dir/data" --io-engine "$engine" "${addr_args[@]}" --log warn \
        >"$RESULTS/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local ctl=("$TANDEMCTL" --endpoint "http://127.0.0.1:$admin")
    local ok=0
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || { cat "$RESULTS/$name.log" >&2; die "tandemd ($engine) exited"; }
        if timeout 5 "${ctl[@]}" status >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    [[ $ok == 1 ]] || die "tandemd ($engine) did not become ready in 20 s"
    timeout 30 "${ctl[@]}" volume create "$VOLUME" --size "${SIZE_GIB}GiB" >&2
    timeout 30 "${ctl[@]}" volume attach "$VOLUME" >&2
    local resolved
    resolved=$(sed -n 's/^ *io engine: *//p' "$RESULTS/$name.log" | head -1)
    TARGETS+=("$name")
    URI[$name]="nbd://127.0.0.1:$nbd/$VOLUME"
    PID_OF[$name]=$pid
    ENGINE_OF[$name]="tandemd --io-engine $engine (running: ${resolved:-?})"
}

start_qemu() {
    local name=qemu-nbd port
    read -r port < <(free_ports 1)
    local img=$WORK/qemu-nbd/$VOLUME.raw
    mkdir -p "$WORK/qemu-nbd"
    truncate -s "${SIZE_GIB}G" "$img"
    log "starting qemu-nbd (port $port, --aio=$QEMU_AIO)"
    qemu-nbd -f raw -x "$VOLUME" --bind 127.0.0.1 --port "$port" --persistent \
        --cache=writeback --aio="$QEMU_AIO" "$img" >"$RESULTS/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local ok=0
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || { cat "$RESULTS/$name.log" >&2; die "qemu-nbd exited"; }
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null; then
            ok=1; break
        fi
        sleep 0.1
    done
    [[ $ok == 1 ]] || die "qemu-nbd did not listen in 20 s"
    TARGETS+=("$name")
    URI[$name]="nbd://127.0.0.1:$port/$VOLUME"
    PID_OF[$name]=$pid
    ENGINE_OF[$name]="qemu-nbd -f raw --cache=writeback --aio=$QEMU_AIO $(qemu-nbd --version | head -1 | awk '{print $2}')"
}

# Listen-address flags of this tandemd build (not the --advertise-* ones, which are not binds).
mapfile -t LISTEN_FLAGS < <("$TANDEMD" --help | grep -oE -- '--[a-z-]+-addr\b' \
    | grep -v -- '^--advertise-' | sort -u)
for e in $ENGINES; do start_tandem "$e"; done
if [[ "$QEMU" == 1 ]]; then start_qemu; fi
(( ${#TARGETS[@]} > 0 )) || die "no targets (ENGINES is empty and QEMU=0)"

# CPU time (user+system, all threads) of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)

sync_fs() { timeout 120 sync -f "$WORK" || log "warning: sync timed out"; }

# ---------------------------------------------------------------------------------------------
# Precondition: sequential fill of every export, all targets at once (nothing is measured
# here, and every target gets the same fill).
log "precondition: sequential 1 MiB fill of ${SIZE_GIB} GiB on every target"
declare -A FILL_PID
for t in "${TARGETS[@]}"; do
    timeout 600 fio --name="fill-$t" --ioengine=nbd --uri="${URI[$t]}" --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_GIB}G" --output-format=json \
        --output="$RESULTS/fill-$t.json" >/dev/null 2>"$RESULTS/fill-$t.err" &
    FILL_PID[$t]=$!
done
for t in "${TARGETS[@]}"; do
    wait "${FILL_PID[$t]}" || { cat "$RESULTS/fill-$t.err" >&2; die "fill of $t failed"; }
done
sync_fs

# ---------------------------------------------------------------------------------------------
# Measured jobs.
WORKLOADS=("randwrite-qd1:randwrite:1" "randwrite-qd32:randwrite:32")
if [[ "$READS" == 1 ]]; then
    WORKLOADS+=("randread-qd1:randread:1" "randread-qd32:randread:32")
fi
FIO_COMMON=(--bs=4k --size="${SIZE_GIB}G" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
    --numjobs=1 --lat_percentiles=1 --percentile_list=50:90:99:99.9 --output-format=json)
echo "fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/$VOLUME --rw=<randwrite|randread> --iodepth=<1|32> ${FIO_COMMON[*]}" \
    > "$RESULTS/fio-command.txt"

INDEX=$RESULTS/index.tsv
: > "$INDEX"
n_targets=${#TARGETS[@]}
total=$((ROUNDS * ${#WORKLOADS[@]} * n_targets))
done_jobs=0
for round in $(seq 1 "$ROUNDS"); do
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r wname rw qd <<<"$w"
        for i in $(seq 0 $((n_targets - 1))); do
            # Rotate the order of the targets from round to round.
            t=${TARGETS[$(((i + round - 1) % n_targets))]}
            sync_fs
            out=$RESULTS/r$round-$wname-$t.json
            done_jobs=$((done_jobs + 1))
            log "[$done_jobs/$total] round $round $wname $t"
            pid=${PID_OF[$t]}
            c0=$(cpu_ticks "$pid")
            timeout $((RUNTIME + RAMP + 60)) fio --name="$wname" --ioengine=nbd --uri="${URI[$t]}" \
                --rw="$rw" --iodepth="$qd" "${FIO_COMMON[@]}" --output="$out" \
                >/dev/null 2>"$out.err" || { cat "$out.err" >&2; die "fio failed: $wname on $t"; }
            c1=$(cpu_ticks "$pid")
            printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$wname" "$t" "$(basename "$out")" \
                "$(python3 -c "print(($c1 - $c0) / $CLK_TCK)")" >> "$INDEX"
        done
    done
done

# ---------------------------------------------------------------------------------------------
# Report.
{
    for t in "${TARGETS[@]}"; do printf '%s\t%s\n' "$t" "${ENGINE_OF[$t]}"; done
} > "$RESULTS/targets.tsv"
cut -d' ' -f1-3 /proc/loadavg > "$RESULTS/load-end.txt"
make_report "$RESULTS"
log "raw fio JSON, logs and summary.md in $RESULTS"
