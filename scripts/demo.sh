#!/usr/bin/env bash
# The default job: the bundled digits data set, an MLP, 2 worker processes, live progress, final accuracy.
# Extra arguments go to 'ddpctl start' (see 'ddpctl start --help').
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build -c release 2>&1 | grep -vE '^\[|^Building|^Build complete|^Compiling|^Write|^Planning' || true
exec .build/release/ddpctl start "$@"
