"""Train a tiny ViT classifier from scratch on the scikit-learn digits data set.

Example (from the repository root):

    python examples/train_digits_vit.py --seed 0 --out examples/digits-vit-seed0

Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), a matching
``preprocessor_config.json`` and ``training_args.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import (  # noqa: E402
    IMAGE_MEAN,
    IMAGE_STD,
    RESCALE_FACTOR,
    id2label,
    label2id,
    load_digits_splits,
)


def build_config():
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        id2label=dict(id2label),
        label2id=dict(label2id),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_image_processor():
    try:  # transformers 5: the PIL backend works without torchvision
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older/newer layouts
        from transformers import ViTImageProcessor as Processor
    return Processor(
        do_resize=False,
        size={"height": 8, "width": 8},
        do_rescale=True,
        rescale_factor=RESCALE_FACTOR,
        do_normalize=True,
        image_mean=[IMAGE_MEAN],
        image_std=[IMAGE_STD],
    )


@torch.no_grad()
def evaluate(model, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(pixel_values=pixel_values[i : i + batch_size]).logits
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-frac", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=str, required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from transformers import ViTForImageClassification

    splits = load_digits_splits(args.seed)
    train = splits["train"][:]
    test = splits["test"][:]
    train_x = train["pixel_values"].float()
    train_y = train["labels"].long()
    test_x = test["pixel_values"].float()
    test_y = test["labels"].long()

    processor = build_image_processor()
    # Sanity check: the saved image processor reproduces the data set preprocessing.
    from sklearn.datasets import load_digits

    raw = load_digits().images[:4].astype(np.float32)[:, None]
    proc = processor(list(raw), return_tensors="pt", input_data_format="channels_first")["pixel_values"]
    expected = torch.from_numpy((raw * RESCALE_FACTOR - IMAGE_MEAN) / IMAGE_STD)
    assert torch.allclose(proc.float(), expected, atol=1e-6), "image processor mismatch"

    torch.manual_seed(args.seed)
    model = ViTForImageClassification(build_config())
    model.train()

    gen = torch.Generator().manual_seed(args.seed)
    n = len(train_y)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_frac * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            out = model(pixel_values=train_x[idx], labels=train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            running += out.loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  train loss {running / n:.4f}", flush=True)
    train_time = time.perf_counter() - t0

    train_acc = evaluate(model, train_x, train_y)
    test_acc = evaluate(model, test_x, test_y)
    print(f"train accuracy {train_acc:.4f}")
    print(f"test accuracy {test_acc:.4f}  ({len(test_y)} images)")
    print(f"train time {train_time:.1f} s")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    record = {
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "warmup_steps": warmup,
        "schedule": "linear warmup + cosine decay",
        "optimizer": "AdamW",
        "num_threads": args.threads,
        "split_seed": 0,
        "n_train": n,
        "n_test": len(test_y),
        "train_accuracy": round(train_acc, 6),
        "test_accuracy": round(test_acc, 6),
        "train_time_s": round(train_time, 2),
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "training_args.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return test_acc


if __name__ == "__main__":
    main()
