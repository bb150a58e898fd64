"""Peak memory of `otfusion-hub fuse` on two BERT-base-shaped checkpoints, against the size of one model.

    python benchmarks/cli_memory.py                    # weights + exact, BERT-base shape (768/3072/12/12)
    python benchmarks/cli_memory.py --small            # tiny models: a smoke run of seconds

Saves two randomly initialised `BertForSequenceClassification` checkpoints, then runs the real command line in a
child process (`python -m hf_otfusion.cli fuse A B --out OUT ...`) and reads the child's peak RSS
(`ru_maxrss` of the finished child). It also runs a child that only imports the package (torch and transformers
with it), so the output says how many models' worth of memory the command held beyond the interpreter and its
libraries.
The memory numbers do not depend on what else the machine runs; the wall times do.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

IMPORTS = "import hf_otfusion.cli, hf_otfusion.fusion, hf_otfusion.job.fuse_job, hf_otfusion.methods.readiness"


def save_parents(directory: Path, shape: dict) -> list[Path]:
    """Two parents with different random weights (seeds 0 and 1), saved as safetensors checkpoints."""
    import torch
    import transformers as T

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = T.BertConfig(**shape, num_labels=3)
        path = directory / f"parent{seed}"
        T.BertForSequenceClassification(config).save_pretrained(path)
        paths.append(path)
    return paths


def child_peak(command: list[str]) -> tuple[float, float]:
    """Runs `command` to completion; returns its peak RSS in GB and its wall seconds.

    `RUSAGE_CHILDREN` reports the largest peak among finished children, so each measurement runs after the
    previous ones in a fresh interpreter (this function is called once per `python` process: see `main`).
    """
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)  # our stdout carries the result alone
    wall = time.perf_counter() - started
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, wall  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models (64/128/2 layers/4 heads)")
    parser.add_argument("--cost", default="weights", choices=["weights"], help="data-free: no alignment data needed")
    parser.add_argument("--solver", default="exact", choices=["exact", "sinkhorn"])
    # internal: `--measure COMMAND...` runs one measurement in this fresh process
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        peak, wall = child_peak(args.measure)
        print(f"{peak:.3f} {wall:.1f}")
        return

    shape = SMALL if args.small else BASE
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"from cli_memory import save_parents; from pathlib import Path; "
             f"save_parents(Path({str(scratch)!r}), {shape!r})"],
            check=True,
        )  # fmt: skip
        parents = [scratch / "parent0", scratch / "parent1"]
        model_gb = sum(p.stat().st_size for p in parents[0].glob("*.safetensors")) / 1e9

        def measure(command: list[str]) -> tuple[float, float]:
            output = subprocess.run(
                [sys.executable, __file__, "--measure", *command], check=True, capture_output=True, text=True
            ).stdout.split()
            return float(output[0]), float(output[1])

        baseline, _ = measure([sys.executable, "-c", IMPORTS])
        fuse = [
            sys.executable, "-m", "hf_otfusion.cli", "fuse", *map(str, parents), "--out", str(scratch / "fused"),
            "--cost", args.cost, "--solver", args.solver, "-q",
        ]  # fmt: skip
        peak, wall = measure(fuse)

    import torch
    import transformers

    shape_text = "/".join(str(shape[k]) for k in BASE)
    print("otfusion-hub fuse: peak memory")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"parents: BertForSequenceClassification {shape_text} (hidden/FFN/layers/heads), {model_gb:.3f} GB each")
    print(f"command: otfusion-hub fuse A B --out OUT --cost {args.cost} --solver {args.solver} -q")
    print(f"{'process':<46} {'peak RSS GB':>11} {'wall s':>7}")
    print(f"{'python + hf_otfusion, torch, transformers':<46} {baseline:>11.3f} {'':>7}")
    print(f"{'otfusion-hub fuse (whole command)':<46} {peak:>11.3f} {wall:>7.1f}")
    extra = (peak - baseline) / model_gb
    print(f"the command held {extra:.1f} models' worth beyond the libraries (weights, maps, costs, temporaries)")


if __name__ == "__main__":
    main()
