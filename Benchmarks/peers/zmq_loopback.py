"""Raw pyzmq transfer speed over tcp://127.0.0.1 between two processes (context for gloo numbers).

What it measures
----------------
Not a PyTorch benchmark: the transport floor that a ZeroMQ-based gradient
exchange runs on.  A child process (multiprocessing, spawn) binds a ZMQ PAIR
socket on 127.0.0.1; the parent connects.  For each payload size in
``--sizes`` (float32 elements) the parent sends a numpy float32 buffer
(``copy=False``) and the child answers with a message of the SAME size
(like a worker sending gradients and receiving averaged weights back), i.e.
one round trip moves 2 x bytes.  After ``--warmup`` round trips, ``--repeats``
are timed with ``time.perf_counter`` on the parent; the median is reported.

  oneway_GBps = bytes / (median round-trip seconds / 2)     (1 GB = 1e9 bytes)

The child receives into a fresh message each time (``copy=False`` frames) and
replies with its own preallocated array, so no summation is included.

Output: one JSON line per size on stdout:
  {"bench": "zmq_loopback_pair_roundtrip", "elements", "bytes", "repeats",
   "rtt_median_s", "rtt_min_s", "oneway_GBps", "pyzmq", "libzmq"}
``run_all.sh`` runs it; compare.sh does not.

Usage:
  $PEER_PYTHON Benchmarks/peers/zmq_loopback.py
      [--sizes 1,9610,669706,1000000,10000000,25000000] [--warmup 3] [--repeats 20]
"""
import argparse
import json
import multiprocessing as mp
import statistics
import time

import numpy as np
import zmq


def echo(port_q, sizes, total):
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    bufs = {n: np.ones(n, dtype=np.float32) for n in sizes}
    for n in sizes:
        for _ in range(total):
            msg = s.recv(copy=False)
            assert len(msg.buffer) == n * 4
            s.send(bufs[n], copy=False)
    s.close(linger=1000)
    ctx.term()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,9610,669706,1000000,10000000,25000000")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    total = args.warmup + args.repeats

    mpc = mp.get_context("spawn")
    q = mpc.Queue()
    p = mpc.Process(target=echo, args=(q, sizes, total))
    p.start()
    port = q.get()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(f"tcp://127.0.0.1:{port}")
    for n in sizes:
        a = np.full(n, 2.0, dtype=np.float32)
        times = []
        for i in range(total):
            t0 = time.perf_counter()
            s.send(a, copy=False)
            msg = s.recv(copy=False)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        med = statistics.median(times)
        print(json.dumps({
            "bench": "zmq_loopback_pair_roundtrip",
            "elements": n, "bytes": n * 4, "repeats": args.repeats,
            "rtt_median_s": round(med, 7), "rtt_min_s": round(min(times), 7),
            "oneway_GBps": round(n * 4 / (med / 2) / 1e9, 3),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        }), flush=True)
    s.close()
    ctx.term()
    p.join()


if __name__ == "__main__":
    main()
