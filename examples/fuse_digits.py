"""Fuse the two shipped digits ViTs and compare parents, vanilla averaging and OT fusion on the test split.

    python examples/fuse_digits.py            # prints an accuracy table, writes the fused model to fused-digits/

Each fusion variant aligns parent 1 onto parent 0 (the anchor) using 200 training images as alignment data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from hf_otfusion import FusionConfig, fuse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_data import load_digits_splits  # noqa: E402

VARIANTS = {
    "vanilla average": FusionConfig(method="vanilla"),
    "OT weights, exact": FusionConfig(cost="weights", solver="exact"),
    "OT activations, exact": FusionConfig(cost="activations", solver="exact"),
    "OT activations, sinkhorn": FusionConfig(cost="activations", solver="sinkhorn", reg=0.3),
}


def accuracy(model, dataset) -> float:
    model.eval()
    with torch.inference_mode():
        logits = model(pixel_values=dataset["pixel_values"]).logits
    return (logits.argmax(-1) == dataset["labels"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="alignment samples from the train split")
    parser.add_argument("--out", type=Path, default=Path("fused-digits"), help="where the best fused model goes")
    args = parser.parse_args()

    splits = load_digits_splits()
    test = splits["test"][:]
    alignment = splits["train"].shuffle(seed=0).select(range(args.samples))
    parents = [ViTForImageClassification.from_pretrained(HERE / f"digits-vit-seed{s}") for s in (0, 1)]

    rows = [(f"parent {k} (seed {k})", accuracy(p, test), 0.0) for k, p in enumerate(parents)]
    best = None
    for name, config in VARIANTS.items():
        started = time.perf_counter()
        fused = fuse(parents, data=alignment, config=config, progress=False)
        seconds = time.perf_counter() - started
        rows.append((name, accuracy(fused, test), seconds))
        if config.method == "ot" and (best is None or rows[-1][1] > best[1]):
            best = (name, rows[-1][1], fused)

    print(f"\nscikit-learn digits, test split ({len(test['labels'])} images), one-shot fusion of 2 ViTs\n")
    print(f"{'model':<28}{'accuracy':>10}{'fuse time':>12}")
    for name, acc, seconds in rows:
        print(f"{name:<28}{acc:>10.3f}{(f'{seconds:.1f} s' if seconds else ''):>12}")
    best[2].save_pretrained(args.out)
    print(f"\nBest OT variant ({best[0]}) saved to {args.out}/ (load it with AutoModelForImageClassification).")


if __name__ == "__main__":
    main()
