"""Single-process PyTorch training-step throughput for float32 MLPs on CPU.

What it measures
----------------
Wall-clock throughput of one full training step -- forward pass, cross-entropy
loss, backward pass and an SGD update (``optimizer.zero_grad(set_to_none=True)``,
``loss.backward()``, ``optimizer.step()``) -- for ReLU MLPs built from
``nn.Linear`` layers, in float32, on the CPU, in one process.

The input batch and labels are pre-generated tensors that are reused every
step, so data loading is *not* included; only compute plus framework overhead.

Configs (``--configs``, default all three):
  digits : 64-128-10,        batch  64  (sklearn digits size; overhead-bound)
  mnist  : 784-512-512-10,   batch 128  (MNIST size)
  gemm   : 784-2048-2048-10, batch 256  (GEMM-bound)

Method: ``--warmup`` untimed steps, then ``--repeats`` timed blocks of
``--steps`` steps each (``time.perf_counter``); per-block steps/s is computed
and the median (plus min/max) over blocks is reported.  The nominal FLOP count
per step is 3 x forward GEMM FLOPs (forward, grad-input, grad-weight:
2*B*in*out each); GFLOP/s uses that count.

Each run uses ``torch.set_num_threads(--threads)`` (default 1).

Output: one JSON line per config on stdout:
  {"bench": "torch_step", "config" ("digits" | "mnist" | "gemm"), "layers",
   "batch", "params", "threads", "steps_per_block", "repeats", "steps_per_s"
   (median over blocks), "steps_per_s_min", "steps_per_s_max", "ms_per_step"
   (1000 / steps_per_s), "samples_per_s", "gflop_per_step", "gflops",
   "final_loss", "torch", "python"}

Benchmarks/compare.sh runs ``--threads 1 --repeats 5`` and reads ``config``
and ``ms_per_step``.  The input is random (``torch.randn``, seed 0): no data
file is read.

Usage:
  $PEER_PYTHON Benchmarks/peers/torch_step.py [--threads 1] [--configs digits,mnist,gemm]
      [--warmup 20] [--repeats 7] [--steps 0] [--min-block-s 1.0]
      [--lr 0.1] [--momentum 0.9]
"""
import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

CONFIGS = {
    "digits": ([64, 128, 10], 64),
    "mnist": ([784, 512, 512, 10], 128),
    "gemm": ([784, 2048, 2048, 10], 256),
}


def make_mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def step_flops(sizes, batch):
    fwd = sum(2 * batch * sizes[i] * sizes[i + 1] for i in range(len(sizes) - 1))
    return 3 * fwd


def bench(name, sizes, batch, args):
    torch.manual_seed(0)
    model = make_mlp(sizes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, sizes[0], dtype=torch.float32)
    y = torch.randint(0, sizes[-1], (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()

    # choose steps per block so one block lasts >= min_block_s
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.2 or n < 3:
        step()
        n += 1
    per_step = (time.perf_counter() - t0) / n
    steps = args.steps or max(3, int(args.min_block_s / per_step) + 1)

    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        dt = time.perf_counter() - t0
        rates.append(steps / dt)
    med = statistics.median(rates)
    fl = step_flops(sizes, batch)
    params = sum(p.numel() for p in model.parameters())
    return {
        "bench": "torch_step",
        "config": name,
        "layers": "-".join(map(str, sizes)),
        "batch": batch,
        "params": params,
        "threads": torch.get_num_threads(),
        "steps_per_block": steps,
        "repeats": args.repeats,
        "steps_per_s": round(med, 2),
        "steps_per_s_min": round(min(rates), 2),
        "steps_per_s_max": round(max(rates), 2),
        "ms_per_step": round(1000.0 / med, 4),
        "samples_per_s": round(med * batch, 1),
        "gflop_per_step": round(fl / 1e9, 4),
        "gflops": round(med * fl / 1e9, 2),
        "final_loss": round(float(loss.detach()), 4),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default="digits,mnist,gemm")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per timed block (0 = auto from --min-block-s)")
    ap.add_argument("--min-block-s", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    for name in args.configs.split(","):
        sizes, batch = CONFIGS[name]
        print(json.dumps(bench(name, sizes, batch, args)), flush=True)


if __name__ == "__main__":
    main()
