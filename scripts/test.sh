#!/usr/bin/env bash
# Installs what is missing, builds everything, and runs the whole test suite.
# The suite has a deadline (TEST_TIMEOUT seconds, default 1800): a hung test fails the run instead of
# stalling it. Output is line-buffered so that what ran before a hang is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build --build-tests
deadline="${TEST_TIMEOUT:-1800}"
status=0
timeout --kill-after=30 "$deadline" stdbuf -oL -eL swift test --skip-build "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "error: the test suite did not finish within $deadline s (TEST_TIMEOUT); the last tests started above did not end" >&2
fi
exit "$status"
