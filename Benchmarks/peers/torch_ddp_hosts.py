"""PyTorch DistributedDataParallel (gloo) across hosts: time to a target test accuracy on the digits.

One process per rank, each started on its own host (Benchmarks/stragglers.sh starts them in the
network namespaces of scripts/netns-hosts.sh), meeting at ``--master`` (rank 0's address) with
``init_method=tcp://MASTER:PORT``; gloo goes over ``GLOO_SOCKET_IFNAME`` (default eth0).

The job is SwiftDDP's in Benchmarks/stragglers.sh: the bundled digits (``digits_data.py``: pixels / 16, 1437
train / 360 test), a ReLU MLP 64-H-H-10 (``--hidden``, default 512,512; PyTorch's default init,
``torch.manual_seed(0)``, DDP broadcasts rank 0's weights), cross-entropy, ``SGD(lr=0.1, momentum=0.9)``,
a global batch of ``--batch-size`` (64) split in contiguous equal shares over the ranks, every batch of an
epoch's permutation (``torch.Generator().manual_seed(1000 + epoch)``) including the last, partial one, so an
epoch is 23 steps as SwiftDDP's.  After each epoch rank 0 evaluates the held-out 360 samples.

Prints, on rank 0, one JSON line per epoch to standard output: ``{"epoch", "step", "elapsed_seconds",
"test_accuracy"}`` (elapsed since training began, after a barrier), then ``{"done": true, ...}``.  Stops
after ``--epochs`` or at the first epoch that reaches ``--target``.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--hidden", default="512,512")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank, world_size=args.world)

    pixels, labels, _ = digits_data.load_csv()
    train_idx, test_idx = digits_data.split_indices(len(labels))
    x = torch.tensor(pixels, dtype=torch.float32) / 16
    y = torch.tensor(labels, dtype=torch.int64)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    torch.manual_seed(0)
    sizes = [64] + [int(h) for h in args.hidden.split(",") if h] + [10]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = DistributedDataParallel(nn.Sequential(*layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    n, batch, step = len(y_train), args.batch_size, 0
    dist.barrier()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
        model.train()
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            share = len(rows) // args.world + (1 if args.rank < len(rows) % args.world else 0)
            first = args.rank * (len(rows) // args.world) + min(args.rank, len(rows) % args.world)
            mine = rows[first:first + share]
            optimizer.zero_grad()
            # DDP averages over ranks; scale so the update is the mean loss over the whole global batch.
            loss = loss_fn(model(x_train[mine]), y_train[mine]) * (len(mine) * args.world / len(rows))
            loss.backward()
            optimizer.step()
            step += 1
        dist.barrier()
        elapsed = time.perf_counter() - started
        if args.rank == 0:
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(json.dumps({"epoch": epoch + 1, "step": step, "elapsed_seconds": elapsed, "test_accuracy": accuracy}), flush=True)
            reached = accuracy >= args.target
        else:
            reached = False
        flag = torch.tensor([1 if reached else 0])
        dist.broadcast(flag, 0)
        if flag.item():
            break
    if args.rank == 0:
        print(json.dumps({"done": True, "steps": step, "elapsed_seconds": time.perf_counter() - started}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
