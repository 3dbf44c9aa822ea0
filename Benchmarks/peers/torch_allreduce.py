"""torch.distributed gloo all_reduce latency/bandwidth on 127.0.0.1 (CPU).

What it measures
----------------
For each world size in ``--world-sizes`` (default 2,4) this spawns that many
processes with ``torch.multiprocessing.spawn``; they join a gloo process group
via ``tcp://127.0.0.1:<port>`` (``GLOO_SOCKET_IFNAME`` defaults to ``lo``).
For each float32 tensor size in ``--sizes`` (elements; default 1M, 10M, 25M,
with M = 1,000,000) every rank runs ``--warmup`` untimed
``dist.all_reduce(t, op=SUM)`` calls and then ``--repeats`` timed ones.  Each
timed call is preceded by ``dist.barrier()`` and measured with
``time.perf_counter`` on every rank; the per-iteration time is the MAX over
ranks (gathered after the timed loop), and the median / min / max over
iterations is reported.

  algbw_GBps = tensor bytes / median seconds             (1 GB = 1e9 bytes)
  busbw_GBps = algbw * 2 * (world - 1) / world           (NCCL-tests convention)

Each rank uses ``torch.set_num_threads(--threads)`` (default 1).  With world
size > number of cores the ranks are oversubscribed; the script does not pin.

Output: one JSON line per (world size, tensor size) on stdout, from rank 0:
  {"bench": "torch_allreduce_gloo", "world_size", "elements", "bytes",
   "repeats", "median_s", "min_s", "max_s" (seconds per all_reduce, max over
   ranks), "algbw_GBps", "busbw_GBps", "correct" (every rank held the
   expected sum), "threads_per_rank", "torch"}

Benchmarks/compare.sh runs ``--world-sizes 2 --sizes 9610,10000000
--repeats 10`` and reads ``elements`` and ``median_s``.

Usage:
  $PEER_PYTHON Benchmarks/peers/torch_allreduce.py [--world-sizes 2,4]
      [--sizes 1000000,10000000,25000000] [--warmup 3] [--repeats 10]
      [--port 0] [--threads 1]
"""
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, sizes, warmup, repeats, threads):
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for n in sizes:
            t = torch.full((n,), float(rank + 1), dtype=torch.float32)
            for _ in range(warmup):
                dist.all_reduce(t)
            times = []
            for _ in range(repeats):
                t.fill_(float(rank + 1))
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            # correctness: sum of (r+1) for r in 0..world-1
            expect = world * (world + 1) / 2
            ok = bool(t[0].item() == expect and t[-1].item() == expect)
            tt = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            okt = torch.tensor([0 if ok else 1], dtype=torch.int64)
            dist.all_reduce(okt)
            if rank == 0:
                per = tt.tolist()
                med = statistics.median(per)
                nbytes = n * 4
                alg = nbytes / med / 1e9
                print(json.dumps({
                    "bench": "torch_allreduce_gloo",
                    "world_size": world,
                    "elements": n,
                    "bytes": nbytes,
                    "repeats": repeats,
                    "median_s": round(med, 6),
                    "min_s": round(min(per), 6),
                    "max_s": round(max(per), 6),
                    "algbw_GBps": round(alg, 3),
                    "busbw_GBps": round(alg * 2 * (world - 1) / world, 3),
                    "correct": int(okt.item()) == 0,
                    "threads_per_rank": threads,
                    "torch": torch.__version__,
                }), flush=True)
            del t
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--sizes", default="1000000,10000000,25000000")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sizes = [int(s) for s in args.sizes.split(",")]
    for world in (int(w) for w in args.world_sizes.split(",")):
        port = args.port or free_port()
        mp.spawn(worker, args=(world, port, sizes, args.warmup, args.repeats, args.threads),
                 nprocs=world, join=True)


if __name__ == "__main__":
    main()
