#!/usr/bin/env bash
# Makes the Python environment of the PyTorch peer that Benchmarks/compare.sh measures SwiftDDP against:
# a virtual environment with torch, numpy, scikit-learn and pyzmq from PyPI (torch is a large download).
#
#   scripts/setup-peer.sh            # the environment goes to $HOME/peer (compare.sh's default PEER_PYTHON)
#   PEER_ENV=DIR scripts/setup-peer.sh
#
# PYTHON names the interpreter the environment is made from (default python3). Safe to run again: it does
# nothing when the environment already imports all four packages. When `python3 -m venv` cannot make an
# environment it installs Debian's python3-venv (with sudo unless run as root).
set -euo pipefail
env_dir="${PEER_ENV:-$HOME/peer}"
python="${PYTHON:-python3}"
packages=(torch numpy scikit-learn pyzmq safetensors)
imports="import torch, numpy, sklearn, zmq, safetensors"

if [ -x "$env_dir/bin/python" ] && "$env_dir/bin/python" -c "$imports" 2>/dev/null; then
  echo "peer environment $env_dir is ready: $("$env_dir/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2
  echo "use it with: PEER_PYTHON=$env_dir/bin/python Benchmarks/compare.sh" >&2
  exit 0
fi

command -v "$python" >/dev/null || { echo "setup-peer: $python not found: install Python 3 first (or set PYTHON)" >&2; exit 1; }

# Debian ships the venv module without ensurepip unless python3-venv is installed: check both.
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c "import ensurepip" 2>/dev/null; then
  command -v apt-get >/dev/null || {
    echo "setup-peer: '$python -m venv' is not usable and apt-get is missing: install Python's venv module" >&2; exit 1; }
  echo "setup-peer: '$python -m venv' is not usable: installing python3-venv" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

if [ ! -x "$env_dir/bin/python" ]; then
  if [ -e "$env_dir" ] && [ -n "$(ls -A "$env_dir" 2>/dev/null)" ]; then
    echo "setup-peer: $env_dir exists and is not a virtual environment: remove it or set PEER_ENV" >&2
    exit 1
  fi
  echo "setup-peer: making the virtual environment $env_dir" >&2
  "$python" -m venv "$env_dir"
fi

echo "setup-peer: installing ${packages[*]} into $env_dir (torch is a large download)" >&2
"$env_dir/bin/python" -m pip install --quiet --upgrade pip
"$env_dir/bin/python" -m pip install --quiet "${packages[@]}"

"$env_dir/bin/python" -c "$imports" || { echo "setup-peer: $env_dir still cannot import ${packages[*]}" >&2; exit 1; }
echo "peer environment $env_dir is ready: $("$env_dir/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2
echo "use it with: PEER_PYTHON=$env_dir/bin/python Benchmarks/compare.sh" >&2
