#!/usr/bin/env bash
# Regenerates the protobuf-c code in Sources/CDDPProto from proto/*.proto.
# Usage: scripts/generate-proto.sh [OUT_DIR]   (default: the committed location)
# Needs protoc-c (Debian: protobuf-c-compiler).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/Sources/CDDPProto}"
command -v protoc-c >/dev/null || { echo "protoc-c not found: apt-get install protobuf-c-compiler" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
protoc-c --proto_path="$root/proto" --c_out="$tmp" "$root"/proto/*.proto
mkdir -p "$out/include"
for c in "$tmp"/*.pb-c.c; do cp "$c" "$out/"; done
for h in "$tmp"/*.pb-c.h; do cp "$h" "$out/include/"; done
