"""PyTorch DistributedDataParallel (gloo, CPU) training throughput and accuracy.

What it measures
----------------
End-to-end data-parallel training of float32 ReLU MLPs on the CPU, per epoch
wall time, ms per step, samples/s, final training loss and test accuracy, for
world sizes given in ``--world-sizes`` (default ``0,1,2``):

  0 : plain single process, no process group, no DDP wrapper (baseline)
  1 : DDP with one rank (measures the wrapper/bucketing cost alone)
  2+: DDP with that many ranks, spawned with torch.multiprocessing, gloo over
      tcp://127.0.0.1 (GLOO_SOCKET_IFNAME defaults to ``lo``)

Benchmarks/compare.sh runs ``--epochs 5 --datasets digits --world-sizes 2``
and ``--epochs 2 --datasets mnist-synth --world-sizes 2`` and reads
``dataset``, ``world_size`` and ``ms_per_step``.

Datasets (``--datasets``, default ``digits,mnist-synth``):
  digits      : the repository's bundled ``Sources/DDPData/Resources/digits.csv``
                (the file SwiftDDP trains on; ``--digits-csv`` reads another
                file of the same format), read by ``digits_data.py``:
                X = pixels / 16 (float32), y = 0..9; the fixed split of
                scikit-learn's ``train_test_split(X, y, test_size=360,
                random_state=0)`` (reproduced with numpy) -> 1437 train /
                360 test.  Model 64-128-10.  The file holds scikit-learn's
                ``load_digits()`` in its order, so the tensors are the same as
                those of the earlier version that called ``load_digits``.
                The file's sha256 goes to stderr.
  mnist-synth : numpy ``default_rng(0)``: X_train 60000x784 and X_test
                10000x784 drawn ``standard_normal`` (float32, train drawn
                first); teacher W 784x10 and b 10 drawn ``standard_normal``
                after them; labels = argmax(X @ W + b).  Model 784-512-512-10.

Training: ``torch.manual_seed(0)`` before building the model (PyTorch default
nn.Linear init; DDP broadcasts rank 0's weights), cross-entropy loss (mean over
the local batch), ``torch.optim.SGD(lr=0.1, momentum=0.9)``, global batch 128
split evenly over ranks (128 / world per rank; DDP averages gradients so the
update equals a 128-sample mean-loss step).  Each epoch draws one permutation
from ``torch.Generator().manual_seed(1000 + epoch)`` (identical on all ranks);
global batch k is perm[128k : 128k+128], rank r takes its contiguous
128/world slice.  The last incomplete global batch is dropped
(digits: 11 steps/epoch, mnist-synth: 468 steps/epoch).  Data sit in memory as
tensors; batches are gathered by index (no DataLoader).

Timing: per epoch, ``dist.barrier()`` (if distributed) then ``perf_counter``
around the training loop and a final barrier; the epoch time is the MAX over
ranks.  Reported ``epoch_s_median`` is the median over epochs excluding the
first (warm-up) when there are >= 3 epochs, ``samples_per_s`` = trained
samples per epoch / epoch_s_median.  ``train_loss_last_epoch`` is the mean of
the minibatch losses of the last epoch (averaged over ranks);
``train_loss_full`` and ``test_acc`` are computed on rank 0 after training
over the full train / test set in eval mode.

Each rank uses ``torch.set_num_threads(--threads)`` (default 1).

Output: one JSON line per (dataset, world size) on stdout, from rank 0:
  {"bench": "torch_ddp_train", "dataset", "layers" ("64-128-10"), "mode"
   ("plain" | "ddp"), "world_size", "threads_per_rank", "global_batch",
   "local_batch", "lr", "momentum", "epochs", "steps_per_epoch", "train_n",
   "test_n", "epoch_s" [per epoch], "epoch_s_median", "ms_per_step"
   (1000 * epoch_s_median / steps_per_epoch), "samples_per_s",
   "train_loss_epochs" [per epoch], "train_loss_last_epoch",
   "train_loss_full", "test_acc", "torch"}

Usage:
  $PEER_PYTHON Benchmarks/peers/torch_ddp_train.py --epochs N
      [--datasets digits,mnist-synth] [--world-sizes 0,1,2] [--threads 1]
      [--lr 0.1] [--momentum 0.9] [--digits-csv PATH]
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import digits_data

GLOBAL_BATCH = 128


def load(name, digits_csv=digits_data.BUNDLED_CSV, announce=False):
    if name == "digits":
        pixels, labels, digest = digits_data.load_csv(digits_csv)
        if announce:
            print(f"digits: {len(labels)} samples from {digits_csv} (sha256 {digest})", file=sys.stderr, flush=True)
        X = (pixels / 16.0).astype(np.float32)
        y = labels.astype(np.int64)
        tr, te = digits_data.split_indices(len(y))
        Xtr, Xte, ytr, yte = X[tr], X[te], y[tr], y[te]
        sizes = [64, 128, 10]
    elif name == "mnist-synth":
        rng = np.random.default_rng(0)
        Xtr = rng.standard_normal((60000, 784), dtype=np.float32)
        Xte = rng.standard_normal((10000, 784), dtype=np.float32)
        W = rng.standard_normal((784, 10), dtype=np.float32)
        b = rng.standard_normal(10, dtype=np.float32)
        ytr = np.argmax(Xtr @ W + b, axis=1).astype(np.int64)
        yte = np.argmax(Xte @ W + b, axis=1).astype(np.int64)
        sizes = [784, 512, 512, 10]
    else:
        raise ValueError(name)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr),
            torch.from_numpy(Xte), torch.from_numpy(yte), sizes)


def make_mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def run(rank, world, port, dataset, epochs, threads, lr, momentum, out_q, digits_csv=digits_data.BUNDLED_CSV):
    """world == 0: plain, no DDP.  world >= 1: DDP with `world` ranks."""
    torch.set_num_threads(threads)
    distributed = world >= 1
    nranks = max(world, 1)
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    try:
        Xtr, ytr, Xte, yte, sizes = load(dataset, digits_csv, announce=rank == 0)
        torch.manual_seed(0)
        model = make_mlp(sizes)
        net = nn.parallel.DistributedDataParallel(model) if distributed else model
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        local = GLOBAL_BATCH // nranks
        assert local * nranks == GLOBAL_BATCH
        n = Xtr.shape[0]
        steps = n // GLOBAL_BATCH
        epoch_times, last_losses = [], []
        for ep in range(epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + ep))
            if distributed:
                dist.barrier()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64)
            net.train()
            for k in range(steps):
                lo = k * GLOBAL_BATCH + rank * local
                idx = perm[lo:lo + local]
                xb, yb = Xtr[idx], ytr[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
            if distributed:
                dist.barrier()
            dt = time.perf_counter() - t0
            stats = torch.tensor([dt, float(loss_sum) / steps], dtype=torch.float64)
            if distributed:
                tmax = torch.tensor([dt], dtype=torch.float64)
                dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
                lsum = stats[1:].clone()
                dist.all_reduce(lsum)
                stats = torch.tensor([tmax.item(), lsum.item() / nranks])
            epoch_times.append(stats[0].item())
            last_losses.append(stats[1].item())

        if rank == 0:
            model.eval()
            with torch.no_grad():
                full_loss = F.cross_entropy(model(Xtr), ytr).item()
                acc = (model(Xte).argmax(1) == yte).float().mean().item()
            timed = epoch_times[1:] if len(epoch_times) >= 3 else epoch_times
            med = statistics.median(timed)
            trained = steps * GLOBAL_BATCH
            rec = {
                "bench": "torch_ddp_train",
                "dataset": dataset,
                "layers": "-".join(map(str, sizes)),
                "mode": "ddp" if distributed else "plain",
                "world_size": nranks,
                "threads_per_rank": threads,
                "global_batch": GLOBAL_BATCH,
                "local_batch": local,
                "lr": lr,
                "momentum": momentum,
                "epochs": epochs,
                "steps_per_epoch": steps,
                "train_n": n,
                "test_n": Xte.shape[0],
                "epoch_s": [round(t, 4) for t in epoch_times],
                "epoch_s_median": round(med, 4),
                "ms_per_step": round(1000 * med / steps, 4),
                "samples_per_s": round(trained / med, 1),
                "train_loss_epochs": [round(l, 5) for l in last_losses],
                "train_loss_last_epoch": round(last_losses[-1], 5),
                "train_loss_full": round(full_loss, 5),
                "test_acc": round(acc, 5),
                "torch": torch.__version__,
            }
            if out_q is not None:
                out_q.put(rec)
            else:
                print(json.dumps(rec), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--datasets", default="digits,mnist-synth")
    ap.add_argument("--world-sizes", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--digits-csv", default=digits_data.BUNDLED_CSV,
                    help="digits file (default: the repository's Sources/DDPData/Resources/digits.csv)")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    for ds in args.datasets.split(","):
        for w in (int(x) for x in args.world_sizes.split(",")):
            if w == 0:
                run(0, 0, 0, ds, args.epochs, args.threads, args.lr, args.momentum, None, args.digits_csv)
            else:
                ctx = mp.get_context("spawn")
                q = ctx.SimpleQueue()
                mp.spawn(run, args=(w, free_port(), ds, args.epochs, args.threads,
                                    args.lr, args.momentum, q, args.digits_csv), nprocs=w, join=True)
                print(json.dumps(q.get()), flush=True)


if __name__ == "__main__":
    main()
