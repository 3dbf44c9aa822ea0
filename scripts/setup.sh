#!/usr/bin/env bash
# Installs the Debian packages SwiftDDP builds against, when they are missing.
# Needs root (or sudo). Swift itself must already be installed.
set -euo pipefail
packages=(libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libopenblas-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "swift not found: install Swift 6 first (https://swift.org/install)" >&2; exit 1; }
