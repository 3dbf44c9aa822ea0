"""Run a benchmark command only on an idle machine and measure foreign CPU load during it.

What it measures
----------------
This box is shared (other processes may compile and benchmark on the same 2 cores),
so every number needs a contamination check.  The wrapper:

1. waits until the whole machine is idle: machine-wide busy CPU (from
   ``/proc/stat``) below 5 % of one core over a 3 s window (gives up waiting
   after ``--max-wait`` s and runs anyway, reporting ``waited_s = -1``);
2. runs the command, stdout -> OUT, stderr -> OUT.err;
3. computes ``foreign_cpu_s`` = machine busy CPU seconds during the run minus
   the command's own CPU seconds (``os.wait4`` rusage, which includes all its
   reaped child processes, e.g. torch.multiprocessing workers), and
   ``foreign_frac`` = foreign_cpu_s / (wall_s * nproc);
4. if ``foreign_frac`` > ``--max-foreign`` (default 0.03) it reruns the command
   (up to ``--tries`` attempts; OUT always holds the last attempt).

Output: one JSON line per attempt on stdout:
  {"cmd", "attempt", "waited_s", "wall_s", "own_cpu_s", "foreign_cpu_s",
   "foreign_frac", "exit_status"}
Linux only.  ``run_all.sh`` wraps every peer benchmark in it; compare.sh
does not use it.

Usage:
  $PEER_PYTHON Benchmarks/peers/quiet_run.py OUT [--max-foreign 0.03] [--tries 5] [--max-wait 900] -- CMD ARGS...
"""
import argparse
import json
import os
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def busy_cpu_s():
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:9]))
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v) - idle) / HZ


def wait_quiet(max_wait, window=3.0, thresh=0.05):
    t0 = time.time()
    while time.time() - t0 < max_wait:
        b0 = busy_cpu_s()
        time.sleep(window)
        if (busy_cpu_s() - b0) / window < thresh:
            return time.time() - t0
    return -1.0


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--max-foreign", type=float, default=0.03)
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--max-wait", type=float, default=900)
    args = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1:]

    for attempt in range(args.tries):
        waited = wait_quiet(args.max_wait)
        b0, t0 = busy_cpu_s(), time.time()
        with open(args.out, "w") as fo, open(args.out + ".err", "w") as fe:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
            _, status, ru = os.wait4(p.pid, 0)
        wall, b1 = time.time() - t0, busy_cpu_s()
        own = ru.ru_utime + ru.ru_stime
        foreign = (b1 - b0) - own
        frac = foreign / (wall * os.cpu_count())
        print(json.dumps({
            "cmd": " ".join(os.path.basename(c) if os.path.isabs(c) else c for c in cmd),
            "attempt": attempt, "waited_s": round(waited, 1), "wall_s": round(wall, 1),
            "own_cpu_s": round(own, 1), "foreign_cpu_s": round(foreign, 2),
            "foreign_frac": round(frac, 4), "exit_status": status,
        }), flush=True)
        if frac <= args.max_foreign:
            break


if __name__ == "__main__":
    main()
