#!/usr/bin/env bash
# Builds Tandem, starts a single-node tandemd on its defaults (data in ./tandem-data,
# admin API 127.0.0.1:9010, NBD 127.0.0.1:10809, metrics 127.0.0.1:9011), then drives it
# with tandemctl: status, create and attach a volume, list. tandemd keeps serving until
# Ctrl-C, which stops it cleanly (SIGTERM: drain, flush, exit).
#
#   scripts/run.sh [tandemd flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p tandem-node
D=target/release/tandemd
C=target/release/tandemctl

"$D" "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' INT TERM

for _ in $(seq 1 100); do
    if "$C" status >/dev/null 2>&1; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "run.sh: tandemd exited; see its error above" >&2
        exit 1
    fi
    sleep 0.1
done

set -x
"$C" status
"$C" volume inspect demo >/dev/null 2>&1 || "$C" volume create demo --size 1GiB --label app=demo
"$C" volume attach demo
"$C" volume list
{ set +x; } 2>/dev/null
echo
echo "tandemd is serving (pid $pid). Try:"
echo "  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10809/demo"
echo "  $C -j volume inspect demo"
echo "Ctrl-C stops tandemd cleanly."
wait "$pid"
