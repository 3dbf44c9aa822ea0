"""Check that the repository's bundled digits file is scikit-learn's digits data set, byte for byte.

What it checks / produces
-------------------------
Not a timing benchmark: the provenance check of the data both sides train on.
It writes ``sklearn.datasets.load_digits()`` (1797 samples, 8x8 images) in the
format of ``Sources/DDPData/Resources/digits.csv`` (the file SwiftDDP embeds
and ``torch_ddp_train.py`` reads): a header line ``label,p0,...,p63``, then
one row per sample in scikit-learn's sample order, ``\\n`` line endings, 65
comma-separated integers per row: the label (0..9) first, then the 64 pixel
values (0..16, row-major 8x8).  It compares those bytes with the bundled file
(``--bundled``, default the repository's) and, when ``OUT.csv`` is given,
writes them there.  Exit status 1 when they differ.

With ``--split PATH`` it also writes a JSON file with the row indices of the
fixed split used by ``torch_ddp_train.py``:
``train_test_split(arange(1797), test_size=360, random_state=0)`` ->
``{"train": [...1437 indices...], "test": [...360 indices...]}`` (in the order
scikit-learn returns them), so another implementation can reproduce the exact
split, and checks that ``digits_data.split_indices`` (numpy only, what the
trainer uses) gives the same indices.

Output: one JSON line on stdout:
  {"bench": "digits_export", "rows", "cols", "bytes", "sha256" (of the
   exported bytes), "label_counts" [10], "bundled_path", "bundled_sha256",
   "matches_bundled", "path" (when OUT.csv given), and with --split:
   "split_path", "split_sha256", "train_n", "test_n", "split_matches_numpy"}

Usage:
  $PEER_PYTHON Benchmarks/peers/digits_export.py [OUT.csv] [--split OUT_split.json]
      [--bundled Sources/DDPData/Resources/digits.csv]
"""
import argparse
import hashlib
import json
import sys

import numpy as np
from sklearn.datasets import load_digits

import digits_data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_csv", nargs="?", default=None, help="also write the exported CSV here")
    ap.add_argument("--split", default=None, help="also write train/test indices JSON here")
    ap.add_argument("--bundled", default=digits_data.BUNDLED_CSV, help="the bundled file to compare with")
    args = ap.parse_args()

    d = load_digits()
    X = d.data
    y = d.target
    Xi = np.rint(X).astype(np.int64)
    assert np.array_equal(Xi, X), "digits pixels are expected to be integers"
    assert Xi.min() >= 0 and Xi.max() <= 16 and X.shape == (1797, 64)

    lines = ["label," + ",".join(f"p{i}" for i in range(64))]
    for label, row in zip(y, Xi):
        lines.append(",".join([str(int(label))] + [str(int(v)) for v in row]))
    data = ("\n".join(lines) + "\n").encode("ascii")
    if args.out_csv:
        with open(args.out_csv, "wb") as f:
            f.write(data)
    with open(args.bundled, "rb") as f:
        bundled = f.read()
    rec = {"bench": "digits_export", "rows": len(lines) - 1, "cols": 65, "bytes": len(data),
           "sha256": hashlib.sha256(data).hexdigest(), "label_counts": np.bincount(y, minlength=10).tolist(),
           "bundled_path": args.bundled, "bundled_sha256": hashlib.sha256(bundled).hexdigest(),
           "matches_bundled": bundled == data}
    if args.out_csv:
        rec["path"] = args.out_csv
    ok = rec["matches_bundled"]

    if args.split:
        from sklearn.model_selection import train_test_split
        tr, te = train_test_split(np.arange(len(y)), test_size=digits_data.TEST_N, random_state=digits_data.SPLIT_SEED)
        split = {"train": tr.tolist(), "test": te.tolist()}
        sdata = json.dumps(split).encode("ascii")
        with open(args.split, "wb") as f:
            f.write(sdata)
        ntr, nte = digits_data.split_indices(len(y))
        rec["split_path"] = args.split
        rec["split_sha256"] = hashlib.sha256(sdata).hexdigest()
        rec["train_n"], rec["test_n"] = len(tr), len(te)
        rec["split_matches_numpy"] = bool(np.array_equal(tr, ntr) and np.array_equal(te, nte))
        ok = ok and rec["split_matches_numpy"]

    print(json.dumps(rec), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
