#!/usr/bin/env bash
# sim.sh: runs the replication-core simulation on any range of seeds.
#
#   scripts/sim.sh FIRST LAST [OPS]     e.g. scripts/sim.sh 0 99999
#
# Each seed is one run of the real coordinator, replica servers, stores and wire protocol
# in one process under a seeded schedule of concurrent operations and faults, checked
# against a model (docs/ARCHITECTURE.md, "The simulation"). CI runs seeds 0-999 with 200
# operations each. A failing seed stops the run and prints the command that replays it;
# add it to REGRESSION_SEEDS in engine/src/replication/tests/sim.rs once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST=${1:?usage: sim.sh FIRST LAST [OPS]}
LAST=${2:?usage: sim.sh FIRST LAST [OPS]}
export TANDEM_SIM_SEEDS="$FIRST-$LAST"
[[ -n ${3:-} ]] && export TANDEM_SIM_OPS=$3
exec cargo test -p tandem-engine --lib replication::tests::sim::replay -- --nocapture
