"""SwiftDDP's GPT against PyTorch's, step by step: the same initial weights, the same batches, the same
optimizer; the loss of each of the first steps must agree to 1e-4 relative.

What it does
------------
1. Builds nanoGPT's model (``peers/nanogpt.py``) with ``torch.manual_seed(0)`` for the bundled corpus
   (Genesis, a character vocabulary: its distinct characters sorted by code point, as SwiftDDP makes it)
   and writes its weights to ``init.safetensors`` under nanoGPT's names (``lm_head.weight`` is
   ``transformer.wte.weight``, tied, so it is left out).
2. Runs ``ddpctl start --model gpt --init-from init.safetensors`` with 1 and with 2 workers (a release
   build: ``swift build -c release`` first), constant learning rate, AdamW, clip_norm 1, and reads each
   step's loss from the job's ``steps.jsonl``.
3. Trains the PyTorch model on the same batches: window ``i`` is tokens ``[64 i, 64 i + 65)``, the last
   10% of the windows held out, and step ``s`` takes the windows SwiftDDP's sampler assigns (its seeded
   Fisher-Yates permutation, SAMPLES in proto/ddp.proto, reimplemented below); AdamW (PyTorch's, all
   parameters decayed as SwiftDDP does), ``clip_grad_norm_``.
4. Prints a table of the losses and the worst relative difference, and exits 1 when it exceeds --tolerance.

Usage:
  $PEER_PYTHON Benchmarks/gpt_parity.py [--steps 20] [--workers 1,2] [--tolerance 1e-4] [--ddpctl .build/release/ddpctl]
Needs torch, numpy and safetensors (pip install safetensors). Not part of the test suite.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "peers"))
from nanogpt import GPT, GPTConfig  # noqa: E402

MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform_below(self, n):
        while True:
            x = self.next()
            r = x % n
            if (x - r) & MASK <= (-n) & MASK:
                return r


def permutation(count, seed):
    order = list(range(count))
    g = SplitMix64(seed)
    for i in range(count - 1, 0, -1):
        j = g.uniform_below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def epoch_seed(seed, epoch):
    return (seed + 0x5DEECE66 * (epoch + 1)) & MASK


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--ddpctl", default=os.path.join(here, "..", ".build", "release", "ddpctl"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    block, seed, held_out = 64, 0, 0.1
    text = open(os.path.join(here, "..", "Sources", "DDPData", "Resources", "genesis.txt"), encoding="utf-8").read()
    symbols = sorted(set(text))
    ids = {c: i for i, c in enumerate(symbols)}
    tokens = torch.tensor([ids[c] for c in text], dtype=torch.long)
    windows = (len(tokens) - 1) // block
    held = min(windows - 1, max(1, int(windows * held_out + 0.5)))
    train_windows = windows - held
    order = permutation(train_windows, epoch_seed(seed, 0))

    torch.manual_seed(0)
    config = GPTConfig(block_size=block, vocab_size=len(symbols), n_layer=4, n_head=4, n_embd=128)
    model = GPT(config)
    work = tempfile.mkdtemp(prefix="gpt-parity-")
    init = os.path.join(work, "init.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, init)

    ours = {}
    for w in [int(x) for x in args.workers.split(",")]:
        jobs = os.path.join(work, f"jobs-{w}")
        command = [args.ddpctl, "start", "--model", "gpt", "--init-from", init, "--workers", str(w), "--epochs", "1",
                   "--batch-size", str(args.batch), "--lr", str(args.lr), "--schedule", "constant", "--warmup-steps", "0",
                   "--seed", str(seed), "--jobs-dir", jobs, "--json"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"gpt_parity: {' '.join(command)} failed: {result.stderr.strip()}")
        job = os.path.join(jobs, os.listdir(jobs)[0])
        steps = [json.loads(line) for line in open(os.path.join(job, "steps.jsonl")) if line.strip()]
        ours[w] = [s["loss"] for s in sorted(steps, key=lambda s: s["step"])][:args.steps]

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    theirs = []
    for step in range(args.steps):
        chosen = order[step * args.batch:(step + 1) * args.batch]
        x = torch.stack([tokens[i * block:i * block + block] for i in chosen])
        y = torch.stack([tokens[i * block + 1:i * block + block + 1] for i in chosen])
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        theirs.append(loss.item())

    header = "step  pytorch     " + "  ".join(f"swiftddp {w}w   rel.diff" for w in ours)
    print(header)
    worst = 0.0
    for s in range(args.steps):
        row = f"{s:4d}  {theirs[s]:.6f}"
        for w, losses in ours.items():
            diff = abs(losses[s] - theirs[s]) / abs(theirs[s])
            worst = max(worst, diff)
            row += f"  {losses[s]:.6f}  {diff:.2e}"
        print(row)
    print(f"worst relative difference over {args.steps} steps: {worst:.2e} (tolerance {args.tolerance:g}); torch {torch.__version__}")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
