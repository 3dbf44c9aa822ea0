#!/usr/bin/env bash
# A longer run of the wire decoder's seeded fuzz loop than the test suite's 100,000 inputs.
# Usage: scripts/fuzz-wire.sh [ITERATIONS] [SEED]     (defaults: 10,000,000 and a random seed)
set -euo pipefail
cd "$(dirname "$0")/.."
iterations="${1:-10000000}"
seed="${2:-$RANDOM$RANDOM}"
echo "fuzzing the wire decoder: $iterations inputs, seed $seed"
DDP_FUZZ_ITERATIONS="$iterations" DDP_FUZZ_SEED="$seed" swift test -c release --filter FuzzTests
