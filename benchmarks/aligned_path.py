"""Where the best average of two aligned parents lies: test loss and accuracy along the aligned linear path.

    apt-get install -y dataset-fashion-mnist && pip install -e ".[bench]"
    python benchmarks/aligned_path.py                 # ViT and DeiT (Fashion-MNIST) pairs

Learned layer weights (`FusionConfig.refine_weights`) move the fused model towards one parent (weights of
0.7-0.94 on the non-anchor parent in `results/quality_refine_options/`). This script asks why, on the committed
pairs (`benchmarks/parents/`, seeds 0 and 1, anchor seed 0):

- the path (1 - t) A + t B, t in [0, 1], between the parents as they are, aligned by permutations, by today's
  closed-form rotations, and by rotations refined at the midpoint (`refine_steps`): each parent is re-expressed
  in the anchor's basis by `align_models` (function-preserving, so both ends are the parents), and the barrier is
  the largest gap between the path and the chord of its ends (loss above it, accuracy below it);
- refinement with learned layer weights fused onto each parent in turn (anchor 0, then anchor 1): if the weights
  lean to the non-anchor parent from both anchors, the lean comes from the method, not from the pair.

Writes `benchmarks/results/aligned_path.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "parents"))
sys.path.insert(0, str(HERE))
from paper_table import (  # noqa: E402
    barrier,
    family_data,
    generated_by,
    load_parents,
    machine_record,
    plot_paths,
    run_families,
    score,
)

from hf_otfusion import FusionConfig, fuse_with_diagnostics  # noqa: E402
from hf_otfusion.alignment import align_models  # noqa: E402

PERMUTATIONS = dict(residual="shared", within_heads="permutation")


def paths_for(refine_steps: int) -> dict[str, dict | None]:
    """Path name -> the FusionConfig fields that align it (None: the parents as they are)."""
    return {
        "unaligned": None,
        "permutations (OT exact, activations)": PERMUTATIONS,
        "rotations, closed form (the default)": {},
        f"rotations refined {refine_steps} steps at t = 0.5": dict(refine_steps=refine_steps),
    }


def run_family(family: str, args, cache: dict, log) -> dict:
    started = time.perf_counter()
    splits = family_data(family, cache, args)
    parents, _ = load_parents(family, [0, 1], args.parents)
    align = splits["train"].shuffle(seed=0).select(range(args.align_samples))
    report: dict = {"family": family, "align_samples": len(align), "paths": {}, "learned_weights": {}}
    report["parents"] = [score(p, splits["test"]) for p in parents]
    for name, fields in paths_for(args.refine_steps).items():
        ends = parents
        if fields is not None:
            config = FusionConfig(batch_size=args.batch_size, **fields)
            ends = align_models(parents, config, data=align, progress=False).models
        curve = barrier(ends[0], ends[1], splits["test"])
        best, middle = int(np.argmax(curve["accuracy"])), len(curve["t"]) // 2
        curve["best_t"] = curve["t"][best]
        report["paths"][name] = curve
        log(f"[{family}] {name}: loss barrier {curve['loss_barrier']:.3f}, accuracy barrier "
            f"{100 * curve['accuracy_barrier']:.2f} points, best t {curve['best_t']} "
            f"({100 * curve['accuracy'][best]:.2f} %), midpoint {100 * curve['accuracy'][middle]:.2f} %")  # fmt: skip
    for anchor in (0, 1):
        config = FusionConfig(batch_size=args.batch_size, refine_steps=args.refine_steps, refine_weights=True,
                              anchor=anchor)  # fmt: skip
        result = fuse_with_diagnostics(parents, data=align, config=config, progress=False)
        weights = {group: [round(w, 3) for w in pair] for group, pair in result.refine.layer_weights.items()}
        on_other = [pair[1 - anchor] for pair in weights.values()]
        test = score(result.model, splits["test"])
        report["learned_weights"][f"anchor {anchor}"] = {
            "weights": weights, "on_non_anchor": [min(on_other), max(on_other)], "test": test,
        }  # fmt: skip
        log(f"[{family}] learned weights, anchor {anchor}: on the non-anchor parent {min(on_other):.2f}-"
            f"{max(on_other):.2f}, test {100 * test['accuracy']:.2f}")  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def write_markdown(reports: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# The aligned linear path between two parents",
        "",
        generated_by("aligned_path.py", meta) + " Pairs: seeds 0 and 1 of "
        "`benchmarks/parents/`, anchor seed 0 (t = 0), test split. Each aligned path joins the parents re-expressed "
        "in the anchor's basis by `align_models` (function-preserving: its ends are the parents).",
        "",
    ]
    for r in reports:
        parents = ", ".join(f"{100 * p['accuracy']:.2f}" for p in r["parents"])
        lines += [f"### {r['family'].upper()} ({r['align_samples']} alignment samples; parents {parents} %)", "",
                  "| path | loss barrier | accuracy barrier (points) | accuracy at t = 0.5 % | best t | "
                  "best accuracy % |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, c in r["paths"].items():
            best, middle = c["accuracy"][c["t"].index(c["best_t"])], c["accuracy"][len(c["t"]) // 2]
            lines.append(f"| {name} | {c['loss_barrier']:.4f} | {100 * c['accuracy_barrier']:.2f} | "
                         f"{100 * middle:.2f} | {c['best_t']} | {100 * best:.2f} |")  # fmt: skip
        lines += ["", "Accuracy % along each path (t = 0 is the anchor, t = 1 the other parent):", "",
                  "| path | " + " | ".join(f"{t:g}" for t in next(iter(r["paths"].values()))["t"]) + " |",
                  "|---|" + "---:|" * len(next(iter(r["paths"].values()))["t"])]  # fmt: skip
        for name, c in r["paths"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in c["accuracy"]) + " |")
        lines += ["", "Refinement with learned layer weights from each anchor (weights: [seed 0, seed 1]):", "",
                  "| anchor | weight on the non-anchor parent (min-max over layer groups) | test accuracy % |",
                  "|---|---:|---:|"]  # fmt: skip
        for name, w in r["learned_weights"].items():
            low, high = w["on_non_anchor"]
            lines.append(f"| {name} | {low:.2f}-{high:.2f} | {100 * w['test']['accuracy']:.2f} |")
        lines.append("")
    lines += ["![Loss and accuracy along the aligned path](aligned_path.png)", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=["vit", "deit", "vit-wide"], default=["vit", "deit"])
    parser.add_argument("--align-samples", type=int, default=1000, help="alignment images (train split)")
    parser.add_argument("--batch-size", type=int, default=64, help="FusionConfig.batch_size")
    parser.add_argument("--refine-steps", type=int, default=500, help="FusionConfig.refine_steps of the refined rows")
    parser.add_argument("--eval-samples", type=int, help="cap the validation and test rows (quick looks only)")
    parser.add_argument("--parents", type=Path, default=HERE / "parents", help="directory of <family>-seed<k>/")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    reports, log = run_families(run_family, args)
    meta = machine_record(args, argv, started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aligned_path.json").write_text(json.dumps({"meta": meta, "families": reports}, indent=1) + "\n")
    write_markdown(reports, meta, args.out / "aligned_path.md")
    plot_paths({f"{r['family']} (anchor seed 0 at t = 0)": r["paths"] for r in reports}, args.out / "aligned_path.png")
    log(f"wrote {args.out / 'aligned_path.md'}, aligned_path.json, aligned_path.png")


if __name__ == "__main__":
    main()
