"""The digits data set the peer scripts train on: the repository's own bundled file, read with numpy.

Not a benchmark: a module imported by ``torch_ddp_train.py`` and ``digits_export.py`` (it prints nothing).

``BUNDLED_CSV`` is ``Sources/DDPData/Resources/digits.csv``, the file SwiftDDP embeds (``BundledData.digits()``),
found relative to this file, so PyTorch and SwiftDDP train on the same bytes.  Its format: a header line
``label,p0,...,p63``, then 1,797 rows of 65 comma-separated integers, the label (0..9) first, then the 64
pixels (0..16, row-major 8x8), in scikit-learn's ``load_digits()`` sample order (``digits_export.py`` checks
that).  ``load_csv`` returns ``(pixels int64 [n, 64], labels int64 [n], sha256 of the file)``; like SwiftDDP
(``scaledToUnitRange``: divide by the largest absolute value, 16) the trainer scales pixels by 1/16.

``split_indices`` is scikit-learn's ``train_test_split(arange(n), test_size=360, random_state=0)`` written
with numpy alone (``ShuffleSplit``: ``RandomState(0).permutation(n)``, the first 360 are the test set, the
rest the training set, in that order), so the trainer needs no scikit-learn; ``digits_export.py --split``
checks it against scikit-learn itself.
"""
import hashlib
import os

import numpy as np

BUNDLED_CSV = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "Sources", "DDPData", "Resources", "digits.csv"))
TEST_N = 360
SPLIT_SEED = 0


def load_csv(path=BUNDLED_CSV):
    """(pixels [n, 64] int64, labels [n] int64, sha256 hex of the file's bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.decode("ascii").splitlines()
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        lines = lines[1:]  # header, as SwiftDDP's CSV reader skips it
    rows = np.array([[int(v) for v in line.split(",")] for line in lines if line.strip()], dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 65:
        raise ValueError(f"{path}: expected rows of 65 integers (label, 64 pixels), got shape {rows.shape}")
    return rows[:, 1:], rows[:, 0], hashlib.sha256(raw).hexdigest()


def split_indices(n, test_n=TEST_N, seed=SPLIT_SEED):
    """(train indices, test indices) as sklearn's train_test_split(arange(n), test_size=test_n, random_state=seed)."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[test_n:], perm[:test_n]
