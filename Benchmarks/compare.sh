#!/usr/bin/env bash
# Runs SwiftDDP's benchmarks (release build) and the PyTorch peer's scripts in the same run and prints one
# table side by side, with ratios (SwiftDDP time / PyTorch time: below 1 is faster).
#
#   Benchmarks/compare.sh [OUT_DIR]
#
# The peer needs a Python with torch (CPU) and numpy: PEER_PYTHON=/path/to/python (default
# $HOME/peer/bin/python, which scripts/setup-peer.sh makes). PEERS points at the peer scripts (default
# Benchmarks/peers in this repository). Raw JSON lines go to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
peer_python="${PEER_PYTHON:-$HOME/peer/bin/python}"
peers="${PEERS:-$(pwd)/Benchmarks/peers}"
"$peer_python" -c "import torch, numpy" 2>/dev/null || {
  echo "compare.sh: $peer_python cannot import torch and numpy: make the peer's environment with scripts/setup-peer.sh (or set PEER_PYTHON)" >&2
  exit 1
}
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
export GLOO_SOCKET_IFNAME=lo
swift build -c release >/dev/null
ddpctl=.build/release/ddpctl

ours() { local name="$1"; shift; "$ddpctl" bench "$@" --json | tee -a "$out/$name.jsonl" >/dev/null; }
peer() { local name="$1"; shift; "$peer_python" "$@" 2>/dev/null | tee -a "$out/$name.jsonl" >/dev/null; }

echo "running (raw results in $out) ..." >&2
ours step_digits step --layers 64,128,10 --batch 64 --threads 1
ours step_mnist step --layers 784,512,512,10 --batch 128 --threads 1
ours step_gemm step --layers 784,2048,2048,10 --batch 256 --threads 1 --repeats 5
peer torch_step "$peers/torch_step.py" --threads 1 --repeats 5
ours exchange_f32 exchange --elements 10000000 --workers 2 --dtype f32
ours exchange_bf16 exchange --elements 10000000 --workers 2 --dtype bf16
ours exchange_f32_frames exchange --elements 10000000 --workers 2 --dtype f32 --no-shared-memory
ours exchange_small exchange --elements 9610 --workers 2 --dtype f32 --rounds 200
peer torch_allreduce "$peers/torch_allreduce.py" --world-sizes 2 --sizes 9610,10000000 --repeats 10
ours train_digits train --workload digits --workers 2 --epochs 20
ours train_mnist train --workload mnist --workers 2 --epochs 1
ours train_long train --workload digits --workers 2 --epochs 1500
peer torch_ddp "$peers/torch_ddp_train.py" --epochs 5 --datasets digits --world-sizes 2
peer torch_ddp "$peers/torch_ddp_train.py" --epochs 2 --datasets mnist-synth --world-sizes 2
ours wire wire --elements 10000000
ours gpt_step gpt --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --vocab-size 71 --batch 32 --threads 1
peer torch_gpt "$peers/torch_gpt.py" --mode eager --vocab-size 71 --threads 1
ours train_gpt train --workload gpt --workers 2 --epochs 1
peer torch_gpt "$peers/torch_gpt.py" --mode ddp --world-size 2 --vocab-size 71

python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name + ".jsonl")
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
def first(name, **match):
    for r in rows(name):
        if all(str(r.get(k)) == str(v) for k, v in match.items()): return r
    return {}
table = []
def line(what, ours_ms, peer_ms, target):
    ratio = ours_ms / peer_ms if ours_ms and peer_ms else float("nan")
    table.append((what, ours_ms, peer_ms, ratio, target))
ts = {r["config"]: r for r in rows("torch_step")}
line("train step 64-128-10 b64 (1 thread)", first("step_digits").get("ms_per_step"), ts.get("digits", {}).get("ms_per_step"), "<= 0.2")
line("train step 784-512-512-10 b128", first("step_mnist").get("ms_per_step"), ts.get("mnist", {}).get("ms_per_step"), "<= 0.9")
line("train step 784-2048-2048-10 b256", first("step_gemm").get("ms_per_step"), ts.get("gemm", {}).get("ms_per_step"), ">= 90% of sgemm")
ar_big = next((r for r in rows("torch_allreduce") if r.get("elements", r.get("size")) in (10000000, "10000000")), {})
ar_small = next((r for r in rows("torch_allreduce") if r.get("elements", r.get("size")) in (9610, "9610")), {})
def ar_ms(r): return r.get("median_ms") or (r.get("median_s", 0) * 1e3 if r.get("median_s") else None)
line("exchange 10M floats, 2 workers, f32", first("exchange_f32").get("ms_per_round"), ar_ms(ar_big), "<= 1.0")
line("exchange 10M floats, 2 workers, bf16", first("exchange_bf16").get("ms_per_round"), ar_ms(ar_big), "<= 0.6")
line("exchange 10M floats, 2 workers, f32 in frames", first("exchange_f32_frames").get("ms_per_round"), ar_ms(ar_big), "(no shared memory)")
line("exchange 9,610 floats, 2 workers", first("exchange_small").get("ms_per_round"), ar_ms(ar_small), "")
ddp = {r.get("dataset"): r for r in rows("torch_ddp") if str(r.get("world_size", r.get("world"))) == "2"}
line("DDP digits 64-128-10, 2 workers, step", first("train_digits").get("ms_per_step"), ddp.get("digits", {}).get("ms_per_step"), "<= 0.4")
line("DDP 784-512-512-10 synthetic, 2 workers, step", first("train_mnist").get("ms_per_step"), ddp.get("mnist-synth", {}).get("ms_per_step"), "<= 0.8")
tg = {r.get("mode"): r for r in rows("torch_gpt")}
line("GPT 4x128 ctx 64 b32 char, 1 thread, step", first("gpt_step").get("ms_per_step"), tg.get("eager", {}).get("ms_per_step"), "<= 0.8")
line("GPT 4x128 ctx 64 b32 char, 2 workers, step", first("train_gpt").get("ms_per_step"), tg.get("ddp", {}).get("ms_per_step"), "<= 0.5")
print(f"{'workload':48} {'SwiftDDP ms':>12} {'PyTorch ms':>11} {'ratio':>7}  target")
for what, o, p, r, t in table:
    fmt = lambda v: f"{v:12.4f}" if isinstance(v, (int, float)) else f"{'-':>12}"
    print(f"{what:48} {fmt(o)} {fmt(p)[1:]} {r:7.2f}  {t}")
g = first("step_gemm")
if g: print(f"784-2048-2048-10: {g['gflops']:.1f} GFLOP/s = {100 * g['fraction_of_sgemm']:.0f}% of sgemm alone ({g['sgemm_only_gflops']:.1f})")
e = first("exchange_f32")
if e: print(f"exchange f32 moved {e['gbytes_per_second']:.2f} GB/s = {100 * e['fraction_of_memcpy']:.0f}% of memcpy ({e['memcpy_gbytes_per_second']:.1f} GB/s)")
w = first("wire")
if w: print(f"wire: 40 MB one way {w['gbytes_per_second']:.2f} GB/s; 9,610-float round trip {w['small_round_trip_ms']:.3f} ms")
t = first("train_digits")
if t: print(f"time from start to first step (digits): {t['first_step_seconds']:.2f} s")
gs = first("gpt_step")
if gs: print(f"GPT step (1 thread): {gs['tokens_per_second']:.0f} tokens/s, {gs['gflops']:.1f} GFLOP/s = {100 * gs['fraction_of_sgemm']:.0f}% of sgemm "
             f"({gs['sgemm_gflops']:.1f}); PyTorch {tg.get('eager', {}).get('tokens_per_s', float('nan')):.0f} tokens/s, "
             f"{tg.get('eager', {}).get('gflops', float('nan')):.1f} GFLOP/s; peak RSS {gs['peak_rss_mb']:.0f} MB (PyTorch {tg.get('eager', {}).get('peak_rss_mb', float('nan')):.0f} MB)")
tt = first("train_gpt")
if tt: print(f"GPT, 2 workers: {tt['tokens_per_second']:.0f} tokens/s (PyTorch DDP {tg.get('ddp', {}).get('tokens_per_s', float('nan')):.0f}); "
             f"a worker's peak RSS {tt['worker_peak_rss_mb']:.0f} MB (goal < 300 MB)")
l = first("train_long")
if l: print(f"long job (digits, 1500 epochs): {1e3 * l['epoch_seconds_first_tenth']:.2f} ms an epoch over the first tenth, "
            f"{1e3 * l['epoch_seconds_last_tenth']:.2f} ms over the last ({l['late_over_early']:.2f}x; target: constant)")
PY
