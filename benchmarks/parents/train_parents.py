"""Train the benchmark's parents from scratch: ViT and DeiT on Fashion-MNIST, BERT on BBC News, one per seed.

    python benchmarks/parents/train_parents.py                      # every family, seeds 0 1 2 (about 30 min)
    python benchmarks/parents/train_parents.py --family vit --seeds 0
    python benchmarks/parents/train_parents.py --family vit-wide --seeds 0 1   # the wider pair (about 40 min)

Each parent is written to `benchmarks/parents/<family>-seed<k>/` with its config, safetensors weights, its
tokenizer or image processor, and `training.json` (seed, recipe, steps, validation and test accuracy, time).
The recipe is hf_otfusion's own `finetune` (transformers `Trainer`) on a freshly initialised model; only the seed
differs between parents of a family (initialisation and data order). Runs are deterministic for a given torch
build and thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from paper_data import (  # noqa: E402
    BBC_MAX_LENGTH,
    bbc_news_text,
    fashion_image_processor,
    fashion_mnist,
    tokenize,
    train_wordpiece,
)

IMAGE = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=BBC_MAX_LENGTH, type_vocab_size=1, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1)  # fmt: skip
# The wider vision pair of benchmarks/quality.py: the ViT above with only the width tripled (hidden 192, MLP 384),
# to see whether a wider residual stream lowers the barrier between independently trained parents.
WIDE_IMAGE = IMAGE | dict(hidden_size=192, intermediate_size=384)

# The training recipe per family (FinetuneConfig fields). Fashion-MNIST: 55k images, batch 128 -> 430 steps/epoch.
# BBC News: 1558 articles, batch 32 -> 49 steps/epoch.
RECIPES = {
    "vit": dict(max_steps=-1, num_train_epochs=4, learning_rate=2e-3, batch_size=128, weight_decay=0.05,
                warmup=0.05, lr_scheduler_type="cosine", logging_steps=50),
    "deit": dict(max_steps=-1, num_train_epochs=4, learning_rate=2e-3, batch_size=128, weight_decay=0.05,
                 warmup=0.05, lr_scheduler_type="cosine", logging_steps=50),
    "vit-wide": dict(max_steps=-1, num_train_epochs=4, learning_rate=2e-3, batch_size=128, weight_decay=0.05,
                     warmup=0.05, lr_scheduler_type="cosine", logging_steps=50),
    "bert": dict(max_steps=-1, num_train_epochs=8, learning_rate=1e-3, batch_size=32, weight_decay=0.05,
                 warmup=0.1, lr_scheduler_type="cosine", logging_steps=20),
}  # fmt: skip
DATA = {"vit": "fashion-mnist", "deit": "fashion-mnist", "vit-wide": "fashion-mnist", "bert": "bbc-news"}


def build_model(family: str, labels: list[str]):
    import transformers as T

    names = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    if family == "bert":
        tokenizer = family_tokenizer()
        config = T.BertConfig(**TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **names)
        return T.BertForSequenceClassification(config)
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(**IMAGE, **names))
    if family == "vit-wide":
        return T.ViTForImageClassification(T.ViTConfig(**WIDE_IMAGE, **names))
    return T.DeiTForImageClassification(T.DeiTConfig(**IMAGE, **names))


_TOKENIZER = None


def family_tokenizer():
    """One WordPiece vocabulary for every BERT parent (trained on the BBC train split): fusion needs a shared
    vocabulary, as two finetunes of one pretrained BERT would have."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = train_wordpiece(bbc_news_text()["train"]["text"])
    return _TOKENIZER


def load_family_data(family: str) -> tuple[dict, object]:
    """The family's encoded splits and the processor that produced them."""
    if family == "bert":
        tokenizer = family_tokenizer()
        return tokenize(bbc_news_text(), tokenizer), tokenizer
    return fashion_mnist(), fashion_image_processor()


def train_parent(family: str, seed: int, data: dict, processor, out: Path, progress: bool, max_steps=None) -> dict:
    from transformers import set_seed

    from hf_otfusion.train.evaluation import evaluate_model
    from hf_otfusion.train.finetune import FinetuneConfig, finetune

    set_seed(seed)
    model = build_model(family, data["train"].features["labels"].names)
    recipe = RECIPES[family] | ({"max_steps": max_steps} if max_steps else {})
    config = FinetuneConfig(**recipe, seed=seed, evaluate_before=False)
    started = time.perf_counter()
    result = finetune(model, data["train"], data["validation"], config, progress=progress)
    seconds = time.perf_counter() - started
    test = evaluate_model(result.model, data["test"], batch_size=256)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "family": family,
        "data": DATA[family],
        "seed": seed,
        "recipe": config.to_dict(),
        "steps": result.steps,
        "train_loss": round(result.train_loss, 6),
        "validation_accuracy": round(result.metrics_after["accuracy"], 6),
        "test_accuracy": round(test["accuracy"], 6),
        "test_loss": round(test["loss"], 6),
        "train_time_s": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "loss_curve": [(entry["step"], round(entry["loss"], 4)) for entry in result.log_history],
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family", nargs="+", choices=list(RECIPES), default=["vit", "deit", "bert"],
        help="default: the three families of paper_table.py (vit-wide, for quality.py, only when named)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=HERE, help="parent directories go here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on a busy 2-core machine, 2 threads thrash)"
    )
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs, not the recipe)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for family in args.family:
        data, processor = load_family_data(family)
        for seed in args.seeds:
            out = args.out / f"{family}-seed{seed}"
            record = train_parent(family, seed, data, processor, out, not args.quiet, args.max_steps)
            print(
                f"{family} seed {seed}: {record['steps']} steps in {record['train_time_s']} s, validation "
                f"{record['validation_accuracy']:.4f}, test {record['test_accuracy']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
