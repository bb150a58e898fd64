"""Fuse the two shipped digits ViTs and compare parents, vanilla averaging and OT fusion on the test split.

    python examples/fuse_digits.py            # prints an accuracy table, writes the fused model to fused-digits/

Each fusion variant aligns parent 1 onto parent 0 (the anchor) using 600 training images as alignment data:
permutations only (how OT fusion worked before rotations), the default (the residual stream and the heads
rotated), the default with repair of the fused units' statistics, the closed-form preset (every linear layer
refitted by least squares on the fused model's own inputs: no training step), and the default with a short
learned refinement of the rotations.
The best variant is then finetuned for 60 steps on the training images, and the result, with the anchor's
image processor, is saved where `pipeline("image-classification", model=...)` loads it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from hf_otfusion import FinetuneConfig, FusionConfig, finetune, fuse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_data import load_digits_splits  # noqa: E402

VARIANTS = {
    "vanilla average": FusionConfig(method="vanilla"),
    "OT permutations only": FusionConfig(residual="shared", within_heads="permutation"),
    "OT rotations (default)": FusionConfig(),
    "OT rotations + repair": FusionConfig(repair="all"),
    "OT closed form (no training)": FusionConfig(quality="closed-form"),
    "OT rotations + refine 200": FusionConfig(refine_steps=200, batch_size=32),
}


def accuracy(model, dataset) -> float:
    model.eval()
    with torch.inference_mode():
        logits = model(pixel_values=dataset["pixel_values"]).logits
    return (logits.argmax(-1) == dataset["labels"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600, help="alignment samples from the train split")
    parser.add_argument("--finetune-steps", type=int, default=60, help="finetuning steps for the best fused model")
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
        if config.method != "vanilla" and (best is None or rows[-1][1] > best[1]):
            best = (name, rows[-1][1], fused)

    recipe = FinetuneConfig(max_steps=args.finetune_steps, learning_rate=5e-4, batch_size=64, warmup=0.1, seed=0)
    started = time.perf_counter()
    tuned = finetune(best[2], splits["train"], config=recipe, progress=False).model
    rows.append(
        (f"{best[0]}, finetuned {args.finetune_steps} steps", accuracy(tuned, test), time.perf_counter() - started)
    )

    print(f"\nscikit-learn digits, test split ({len(test['labels'])} images), one-shot fusion of 2 ViTs\n")
    print(f"{'model':<48}{'accuracy':>10}{'time':>10}")
    for name, acc, seconds in rows:
        print(f"{name:<48}{acc:>10.3f}{(f'{seconds:.1f} s' if seconds else ''):>10}")
    tuned.save_pretrained(args.out)
    shutil.copyfile(HERE / "digits-vit-seed0" / "preprocessor_config.json", args.out / "preprocessor_config.json")
    print(f"\nThe finetuned {best[0]} model is in {args.out}/ with its image processor: "
          f'pipeline("image-classification", model="{args.out}") loads it.')  # fmt: skip


if __name__ == "__main__":
    main()
