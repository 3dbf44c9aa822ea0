"""PyTorch's time for one GPT training step on CPU: eager in one process, and DDP on gloo.

What it measures
----------------
nanoGPT's model (``nanogpt.py`` beside this script) of ``--n-layer/--n-head/--n-embd/--block-size`` and
a character vocabulary of `--vocab-size` tokens (65; compare.sh: 71, the bundled corpus), batch ``--batch`` of random tokens (seed 0) reused every step; a step
is ``zero_grad(set_to_none=True)``, forward with the loss, ``backward()`` and ``AdamW.step()``
(lr 1e-3, weight decay 0.1).

- ``--mode eager``: one process, ``torch.set_num_threads(--threads)``.
- ``--mode ddp``: ``--world-size`` processes on this host (gloo over loopback, one thread each), each with
  ``batch / world_size`` sequences, ``DistributedDataParallel`` averaging the gradients; the step time
  is rank 0's.

Method: ``--warmup`` untimed steps, then ``--repeats`` blocks of ``--steps`` steps; the median ms per step
over blocks (plus min and max). FLOPs per token: ``6 N + 12 L T C`` (N without the position table).

Output: one JSON line on stdout: {"bench": "torch_gpt", "mode", "world_size", "n_layer", "n_head",
"n_embd", "block_size", "batch", "threads", "ms_per_step", "ms_per_step_min", "ms_per_step_max",
"tokens_per_s", "gflops", "peak_rss_mb", "torch"}.

Usage:
  $PEER_PYTHON Benchmarks/peers/torch_gpt.py [--mode eager|ddp] [--world-size 2] [--threads 1]
      [--n-layer 4] [--n-head 4] [--n-embd 128] [--block-size 64] [--batch 32] [--vocab-size 65] [--repeats 5] [--steps 10]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt import GPT, GPTConfig  # noqa: E402


def flops_per_token(c):
    n = c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd
    return 6 * n + 12 * c.n_layer * c.block_size * c.n_embd


def timed_steps(model, opt, x, y, args, barrier=None):
    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
    for _ in range(args.warmup):
        step()
    blocks = []
    for _ in range(args.repeats):
        if barrier:
            barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        blocks.append((time.perf_counter() - start) / args.steps * 1e3)
    return blocks


def config_of(args):
    return GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


def batch_of(args, rows, offset=0):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (args.batch, args.block_size + 1), generator=g)[offset:offset + rows]
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def report(args, blocks, world):
    c = config_of(args)
    ms = statistics.median(blocks)
    tokens = args.batch * args.block_size
    print(json.dumps({
        "bench": "torch_gpt", "mode": args.mode, "world_size": world, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_embd": c.n_embd, "block_size": c.block_size, "batch": args.batch, "threads": args.threads,
        "ms_per_step": ms, "ms_per_step_min": min(blocks), "ms_per_step_max": max(blocks),
        "tokens_per_s": tokens / ms * 1e3, "gflops": flops_per_token(c) * tokens / ms / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__}), flush=True)


def eager(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(config_of(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = batch_of(args, args.batch)
    report(args, timed_steps(model, opt, x, y, args), 1)


def ddp_rank(rank, world, port, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(config_of(args)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rows = args.batch // world
    x, y = batch_of(args, rows, rank * rows)
    blocks = timed_steps(model, opt, x, y, args, barrier=dist.barrier)
    if rank == 0:
        report(args, blocks, world)
    dist.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["eager", "ddp"], default="eager")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if args.mode == "eager":
        eager(args)
    else:
        mp.spawn(ddp_rank, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
