#!/usr/bin/env python3
"""Fits SwiftDDP's exchange cost model to measured rounds and predicts step times at scale.

Input: JSON lines of `ddpctl bench exchange --json` (several worker counts and sizes), on stdin or as files.
Model of one synchronous round through K coordinator shards (the coordinator of each shard receives every
worker's part and sends every worker the update):

    T(W, bytes, K) = a * W + b * W * bytes / K + c * W * bytes / K

with a the per-message cost (seconds per worker message pair), b the per-byte transfer cost of the
coordinator's link (1 / bandwidth, both directions) and c the per-byte averaging cost. On loopback b and c
are both memory costs and are fitted together as one per-byte term; on a network b = 2 / link bandwidth.
A ring allreduce (gloo, NCCL) moves 2 (W - 1) / W * bytes per worker and needs 2 (W - 1) message steps.
"""
import json
import sys


def load(paths):
    lines = []
    for f in paths or [sys.stdin]:
        stream = open(f) if isinstance(f, str) else f
        lines += [json.loads(l) for l in stream if l.strip()]
    return [r for r in lines if r.get("benchmark") == "exchange"]


def fit(rows):
    # least squares of the relative error for t = a*W + p*W*bytes (p = per-byte cost of one worker's tensor,
    # both ways plus averaging): each round weighs by 1/t, so small rounds fix a and large ones fix p
    x1 = [r["workers"] / r["seconds"] for r in rows]
    x2 = [r["workers"] * r["bytes_per_round"] / (2 * r["workers"]) / r["seconds"] for r in rows]
    sxx = sum(x * x for x in x1)
    sxy = sum(x * y for x, y in zip(x1, x2))
    syy = sum(y * y for y in x2)
    tx = sum(x1)
    ty = sum(x2)
    det = sxx * syy - sxy * sxy
    a = (tx * syy - ty * sxy) / det
    p = (sxx * ty - sxy * tx) / det
    return a, p


def main():
    rows = load(sys.argv[1:])
    if not rows:
        sys.exit("no exchange results on input")
    a, p = fit(rows)
    print(f"fitted on {len(rows)} measured rounds (loopback, this machine):")
    print(f"  per-message cost a = {a * 1e6:.1f} us per worker; per-byte cost p = {p * 1e9:.3f} ns/byte "
          f"({1 / p / 1e9:.2f} GB/s effective per worker tensor, both ways plus averaging)")
    print()
    print(f"{'workers':>7} {'MB/worker':>10} {'measured ms':>12} {'model ms':>9}")
    for r in sorted(rows, key=lambda r: (r["bytes_per_round"] / r["workers"], r["workers"])):
        size = r["bytes_per_round"] / (2 * r["workers"])
        model = a * r["workers"] + p * r["workers"] * size
        print(f"{r['workers']:7d} {size / 1e6:10.2f} {r['seconds'] * 1e3:12.3f} {model * 1e3:9.3f}")
    print()
    size = 2.7e6  # 784-512-512-10 in f32 (669,706 parameters)
    averaging = 0.25e-9  # s/byte to sum one worker's tensor into the accumulator (measured order: 4 GB/s)
    print(f"predicted exchange per step for a 669,706-parameter model ({size / 1e6:.1f} MB f32; bf16 halves the byte terms):")
    print(f"{'link':>8} {'W':>4} {'K=1 ms':>9} {'K=4 ms':>9} {'K=16 ms':>9} {'ring ms':>9}")
    for name, gbit in (("10G", 10), ("25G", 25), ("100G", 100)):
        bandwidth = gbit / 8 * 1e9
        for w in (2, 8, 32, 128, 256):
            def shard(k):
                k = min(k, w)
                return (a * w + w * size / k * (2 / bandwidth + averaging)) * 1e3
            ring = (2 * (w - 1) * a + 2 * (w - 1) / w * size / bandwidth) * 1e3
            print(f"{name:>8} {w:4d} {shard(1):9.2f} {shard(4):9.2f} {shard(16):9.2f} {ring:9.2f}")


if __name__ == "__main__":
    main()
