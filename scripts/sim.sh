#!/usr/bin/env bash
# sim.sh: runs the replication-core simulation on any range of seeds.
#
#   scripts/sim.sh FIRST LAST [OPS]     e.g. scripts/sim.sh 0 99999
#   scripts/sim.sh --exact FIRST LAST   runs each seed twice and compares the traces
#
# Each seed is one deterministic run of the real coordinator, replica servers, stores and
# wire codec, on one thread with a simulated network and clock, under a seeded schedule of
# concurrent operations and faults, checked against a model (docs/ARCHITECTURE.md, "The
# simulation"). CI runs seeds 0-999 with 200 operations each. A failing seed stops the run
# and prints the command that replays it (the same trace); add it, with its profile, to
# REGRESSION_SEEDS in engine/src/replication/tests/sim.rs once it is fixed.
# TANDEM_SIM_PROFILE=1..6 runs an older fault profile (default: the current one, 7).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --exact ]]; then
    export TANDEM_SIM_EXACT="${2:?usage: sim.sh --exact FIRST LAST}-${3:?usage: sim.sh --exact FIRST LAST}"
    exec cargo test -p tandem-engine --lib replication::tests::sim::replay_is_exact -- --nocapture
fi
FIRST=${1:?usage: sim.sh FIRST LAST [OPS]}
LAST=${2:?usage: sim.sh FIRST LAST [OPS]}
export TANDEM_SIM_SEEDS="$FIRST-$LAST"
[[ -n ${3:-} ]] && export TANDEM_SIM_OPS=$3
exec cargo test -p tandem-engine --lib replication::tests::sim::replay -- --nocapture
