"""scikit-learn digits (8x8 grey, 10 classes) as a Hugging Face ``DatasetDict``.

Importing this module has no side effects; call :func:`load_digits_splits`.

Preprocessing (matches the ``ViTImageProcessor`` saved next to the example models):
pixel values 0..16 are rescaled by 1/16 to [0, 1], then normalised with mean 0.5 and
std 0.5 to [-1, 1]; images are shaped ``(1, 8, 8)`` (channels first).
"""

from __future__ import annotations

import numpy as np

ID2LABEL: dict[int, str] = {i: str(i) for i in range(10)}
LABEL2ID: dict[str, int] = {name: i for i, name in ID2LABEL.items()}
# Plain-dict aliases (as used in ``ViTConfig(id2label=..., label2id=...)``).
id2label = ID2LABEL
label2id = LABEL2ID

SPLIT_SEED = 0
TEST_FRACTION = 0.2
RESCALE_FACTOR = 1.0 / 16.0
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def preprocess(images: np.ndarray) -> np.ndarray:
    """Map raw digits images (N, 8, 8) with values 0..16 to float32 (N, 1, 8, 8)."""
    x = np.asarray(images, dtype=np.float32) * np.float32(RESCALE_FACTOR)
    x = (x - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return x[:, None, :, :].astype(np.float32)


def load_digits_splits(seed: int = 0):
    """Return a ``DatasetDict`` with "train" (~80 %) and "test" (~20 %) splits.

    The split is stratified and always uses ``SPLIT_SEED`` (0): ``seed`` is accepted
    for call-site symmetry with the training seed but does not change the split, so
    every model is evaluated on the same test set.
    Columns: ``pixel_values`` (float32, (1, 8, 8)) and ``labels`` (int64), torch format.
    """
    del seed  # the split is fixed on purpose
    from datasets import Array3D, Dataset, DatasetDict, Features, Value
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = preprocess(digits.images)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    features = Features({"pixel_values": Array3D(shape=(1, 8, 8), dtype="float32"), "labels": Value("int64")})
    splits = {}
    for name, sel in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        ds = Dataset.from_dict({"pixel_values": pixels[sel], "labels": labels[sel]}, features=features)
        splits[name] = ds.with_format("torch")
    return DatasetDict(splits)
