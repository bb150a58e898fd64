"""What the rotations (and optionally repair) cost at ViT-B / BERT-base size, side by side with permutation-only OT.

    python benchmarks/rotation_cost.py                 # permutations vs the default rotations, ~4 min on 2 cores
    python benchmarks/rotation_cost.py --family bert   # the same for a BERT-base pair (within-head rotations)
    python benchmarks/rotation_cost.py --with-repair   # also repair="all" (each configuration capped at --timeout)
    python benchmarks/rotation_cost.py --cost weights  # data-free: permutations vs the rotation (2 rounds, and 1)
    python benchmarks/rotation_cost.py --cost weights --refine-steps 10   # also quality="best"'s refinement
    python benchmarks/rotation_cost.py --cost weights --regmean   # also RegMean, and quality="closed-form"

A random-init ViT-B-shaped pair (`ViTConfig()` defaults: 224px, patch 16, 768/3072, 12 layers) and 64 random
images, or a BERT-base-shaped pair (`BertConfig()` defaults: 768/3072, 12 layers, 30522 tokens) and 64 random
sequences of 128 tokens; `tokens_per_sample=32`, `batch_size=16`, 2 torch threads. Each configuration fuses in a
fresh process, which prints one JSON line: wall seconds, the process's peak RSS and the stage timings. Random
parents say nothing about accuracy (see `quality.py` for that); this measures time and memory only. The default
rotates the residual stream and within heads on the pre-LN ViT, and only within heads on the post-LN BERT.

`--refine-steps N` adds the refinement of `quality="best"` (learned layer weights) cut to N steps, with
`batch_size=8` so that the 64 rows make the 5 batches refinement needs at least (one held back); its line adds
`refine_s_per_step`, the refinement's seconds (the ensemble's targets on every batch, then the steps) over N,
which is what to multiply by `quality="best"`'s 1000 steps. `--regmean` adds RegMean in place of the average
after the same maps (`method="regmean"`, `align="ot"`, both rotations), alone and with repair (the former
`quality="closed-form"`), and the `quality="closed-form"` preset (the data-free maps, RegMean on the fused inputs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "permutations only": {"residual": "shared", "within_heads": "permutation"},
    "default (rotations)": {},
}
REPAIR = {"default + repair all": {"repair": "all"}}
ONE_ROUND = {"default with rotation_rounds=1": {"rotation_rounds": 1}}  # data-free only
REGMEAN = {
    "RegMean after both rotations": {"method": "regmean", "align": "ot", "residual": "orthogonal",
                                     "within_heads": "orthogonal"},
    "RegMean after both rotations + repair (quality='closed-form' before)": {
        "method": "regmean", "align": "ot", "residual": "orthogonal", "within_heads": "orthogonal", "repair": "all"},
    "quality='closed-form' (data-free maps, RegMean on the fused inputs)": {"quality": "closed-form"},
}  # fmt: skip


def fuse_once(fields: dict, family: str) -> dict:
    import torch
    import transformers as T
    from datasets import Dataset

    from hf_otfusion import FusionConfig, fuse_with_diagnostics

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    if family == "bert":  # BERT-base and 64 sequences of 128 random tokens
        model_class, model_config = T.BertForSequenceClassification, T.BertConfig(num_labels=10)
        ids = torch.randint(1000, 30000, (64, 128), generator=generator)
        data = Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    else:  # ViT-B/16 and 64 random 224x224 images
        model_class, model_config = T.ViTForImageClassification, T.ViTConfig(num_labels=10)
        data = Dataset.from_dict({"pixel_values": torch.randn(64, 3, 224, 224, generator=generator).numpy()})
    parents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        parents.append(model_class(model_config).eval())
    config = FusionConfig(**{"batch_size": 16, "tokens_per_sample": 32, **fields})
    started = time.perf_counter()
    result = fuse_with_diagnostics(parents, data=data, config=config, progress=False)
    measured = {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "timings": {k: round(v, 1) for k, v in result.timings.items()},
    }
    if config.refine_steps:
        measured["refine_s_per_step"] = round(result.timings["refine"] / config.refine_steps, 2)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["vit", "bert"], default="vit", help="the ViT-B or the BERT-base pair")
    parser.add_argument("--with-repair", action="store_true", help="also measure repair='all'")
    parser.add_argument("--cost", choices=["activations", "weights"], default="activations", help="FusionConfig.cost")
    parser.add_argument("--timeout", type=int, default=580, help="seconds allowed per configuration")
    parser.add_argument("--refine-steps", type=int, default=0, help="also time quality='best''s refinement, N steps")
    parser.add_argument("--regmean", action="store_true", help="also RegMean and quality='closed-form'")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, as JSON fields
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(fuse_once(json.loads(args.one), args.family)))
        return
    configs = {**CONFIGS, **(REPAIR if args.with_repair else {}), **(ONE_ROUND if args.cost == "weights" else {})}
    if args.regmean:
        configs.update(REGMEAN)
    if args.refine_steps:
        configs[f"default + refine {args.refine_steps} steps with layer weights"] = {
            "refine_steps": args.refine_steps,
            "refine_weights": True,
            "batch_size": 8,
        }
    for name, fields in configs.items():
        fields = {**fields, "cost": args.cost}
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--family", args.family, "--one", json.dumps(fields)],
                capture_output=True, text=True, timeout=args.timeout,
            )  # fmt: skip
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            line = f"did not finish within {args.timeout} s"
        print(f"{name}: {line}", flush=True)


if __name__ == "__main__":
    main()
