"""scikit-learn's bundled 8x8 digits (1797 images, no download), split into two 5-class tasks.

    data = digits.load(seed=0)                      # {"train": (x, y), "test": (x, y)}
    source, target = digits.tasks(data)             # digits 0-4, and 5-9 relabelled 0..4
    it = digits.batches(*source["train"], batch_size=64, seed=0)
    it = digits.batches(*source["train"], batch_size=64, seed=0, start=100)   # from batch 100 on (a resume)

``x`` is ``float32 [n, 64]``, pixels scaled from 0..16 to [0, 1]; ``y`` is
``int32 [n]``. The train/test split is stratified by digit and fixed by
``seed`` (``sklearn.model_selection.train_test_split``): with the defaults,
``test_fraction=0.25``, 1347 train and 450 test images.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Split = tuple[np.ndarray, np.ndarray]


def load(seed: int = 0, test_fraction: float = 0.25) -> dict[str, Split]:
    """The full 10-class set as ``{"train": (x, y), "test": (x, y)}``, a stratified split seeded by ``seed``."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def subset(split: Split, classes: tuple[int, ...]) -> Split:
    """The examples of ``classes``, relabelled ``0..len(classes)-1`` in the order given."""
    x, y = split
    keep = np.isin(y, classes)
    remap = np.full(max(classes) + 1, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    return x[keep], remap[y[keep]]


def tasks(data: dict[str, Split]) -> tuple[dict[str, Split], dict[str, Split]]:
    """``(source, target)``: digits 0-4 (labels 0..4) and digits 5-9 (labels remapped to 0..4)."""
    lo, hi = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    return ({k: subset(v, lo) for k, v in data.items()},
            {k: subset(v, hi) for k, v in data.items()})


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, start: int = 0) -> Iterator[Split]:
    """Endless ``(x, y)`` batches of exactly ``batch_size``: a fresh seeded permutation per epoch.

    Batch ``k`` (0-based) is a pure function of ``(seed, k)``: epoch ``k // (n // batch_size)`` uses
    the permutation drawn that many times into ``np.random.default_rng(seed)``. ``start`` begins at
    batch ``start``, as the iterator with ``start=0`` would after ``start`` batches (what a resumed run
    needs) without gathering the batches skipped.
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples available.")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    per_epoch = n // batch_size
    epochs, skip = divmod(start, per_epoch)
    for _ in range(epochs):
        rng.permutation(n)
    while True:
        order = rng.permutation(n)
        for i in range(skip * batch_size, per_epoch * batch_size, batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
        skip = 0
