#!/usr/bin/env bash
# Runs every PyTorch peer benchmark in this folder with the sizes behind the reference table in README.md
# and writes raw JSON lines into OUT_DIR (one .jsonl per command, plus the exported digits CSV / split).
# Each command goes through quiet_run.py: it waits for an idle machine, records foreign CPU load in
# OUT_DIR/quiet.log and reruns a command that shared the CPUs (> 3 % foreign load).
# Benchmarks/compare.sh does not use this script (it runs a few of these beside SwiftDDP's benchmarks).
# Interpreter: $PEER_PYTHON (default $HOME/peer/bin/python, made by scripts/setup-peer.sh).
#
# Usage: [PEER_PYTHON=/path/to/python] Benchmarks/peers/run_all.sh OUT_DIR
set -euo pipefail
OUT="${1:?usage: run_all.sh OUT_DIR}"
PY="${PEER_PYTHON:-$HOME/peer/bin/python}"
HERE="$(cd "$(dirname "$0")" && pwd)"
"$PY" -c "import torch, numpy, sklearn, zmq" 2>/dev/null || {
  echo "run_all.sh: $PY cannot import torch, numpy, sklearn and zmq: run scripts/setup-peer.sh (or set PEER_PYTHON)" >&2; exit 1; }
mkdir -p "$OUT"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"

run() {  # name, script args...
  local name="$1"; shift
  echo "== $name: $*" >&2
  "$PY" "$HERE/quiet_run.py" "$OUT/$name.jsonl" -- "$PY" "$@" | tee -a "$OUT/quiet.log" >&2
  cat "$OUT/$name.jsonl"
}

run step_t1         "$HERE/torch_step.py" --threads 1
run step_t2         "$HERE/torch_step.py" --threads 2
run allreduce       "$HERE/torch_allreduce.py" --world-sizes 2,4 --sizes 1000000,10000000,25000000 --repeats 10
run allreduce_model "$HERE/torch_allreduce.py" --world-sizes 2 --sizes 9610,669706,5824522 --repeats 20
run ddp_digits      "$HERE/torch_ddp_train.py" --epochs 100 --datasets digits --world-sizes 0,1,2
run ddp_mnist       "$HERE/torch_ddp_train.py" --epochs 3 --datasets mnist-synth --world-sizes 0,1,2
run plain_t2        "$HERE/torch_ddp_train.py" --epochs 3 --datasets mnist-synth --world-sizes 0 --threads 2
run plain_t2_digits "$HERE/torch_ddp_train.py" --epochs 100 --datasets digits --world-sizes 0 --threads 2
run digits_export   "$HERE/digits_export.py" "$OUT/digits.csv" --split "$OUT/digits_split.json"
run zmq_loopback    "$HERE/zmq_loopback.py"
