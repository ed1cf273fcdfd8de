"""scikit-learn's built-in handwritten digits."""

from __future__ import annotations

import numpy as np
import torch

from .common import (
    DIGITS_TEST_FRACTION,
    DIGITS_TEST_SEED,
    DataBundle,
    _finish_bundle,
    _split_train_val,
    _TensorSource,
)

# --------------------------------------------------------------------------- digits


def _load_digits(input_shape, val_fraction, seed, mean, std, augment, limit) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # values 0..16 -> 0..255 uint8 so every source shares the uint8 image convention
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(d.target.astype(np.int64))
    all_idx = np.arange(len(targets))
    pool, test_idx = train_test_split(
        all_idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_TEST_SEED, stratify=d.target
    )
    pool, test_idx = np.sort(pool), np.sort(test_idx)
    source = _TensorSource(images, targets)
    tr, va = _split_train_val(d.target[pool], val_fraction, seed, limit)
    tr, va = pool[tr], pool[va]
    return _finish_bundle(
        source, tr, va, test_idx, source, num_classes=10, native_channels=1, native=(8, 8),
        input_shape=input_shape, known=None, mean=mean, std=std, augment=augment, flip=False,
        name="digits", seed=seed,
    )
