"""One process of the 2-process run in test_distributed.py, started there with torchrun (gloo on CPU).

It collects the activation statistics of the saved parents with the data sharded across processes, then runs
the CLI's `fuse` (with `--push-to-hub` to the test's local Hub server) exactly as `torchrun -m hf_otfusion.cli
fuse ...` would, and records per process what it
saw and did: the process count, the samples it ran, how often it saved a model. The test compares all of it
with a single-process run.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import PartialState
from datasets import load_from_disk
from safetensors.torch import save_file

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics
from hf_otfusion.cli import main as cli_main
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.statistics import collect_statistics

BATCH_SIZE = 4
BEST_CONFIG = FusionConfig(quality="best", refine_steps=4, batch_size=BATCH_SIZE)


def run(workdir: Path) -> None:
    torch.set_num_threads(1)  # the same kernels as the single-process reference, so batches match bit for bit
    state = PartialState(cpu=True)
    parents = [transformers.AutoModelForSequenceClassification.from_pretrained(workdir / n) for n in ("a", "b")]
    data = load_from_disk(str(workdir / "align"))
    samples = {"statistics": 0, "cli": 0, "quality": 0}
    phase = "statistics"
    forward = transformers.BertForSequenceClassification.forward

    @functools.wraps(forward)  # keeps the signature, from which the pass picks the input columns
    def counted_forward(model, *args, **kwargs):  # every parent of every pass, loaded here or by the CLI
        samples[phase] += len(kwargs["input_ids"])
        return forward(model, *args, **kwargs)

    transformers.BertForSequenceClassification.forward = counted_forward
    plans = [resolve_plan(parent) for parent in parents]
    stats = collect_statistics(parents, plans, data, anchor=0, batch_size=BATCH_SIZE, progress=False, process=state)
    if state.is_main_process:
        arrays = {}
        for key, s in stats[1].items():
            arrays.update({f"{key}|{field}": getattr(s, field) for field in ("mean_a", "mean_b", "m2_a", "m2_b")})
            arrays[f"{key}|comoment"], arrays[f"{key}|count"] = s.comoment, np.array(s.count)
        np.savez(workdir / "stats.npz", **arrays)

    saves = []
    save_pretrained = transformers.PreTrainedModel.save_pretrained

    def counted_save(model, *args, **kwargs):
        saves.append(str(args[0] if args else kwargs.get("save_directory")))
        return save_pretrained(model, *args, **kwargs)

    transformers.PreTrainedModel.save_pretrained = counted_save
    phase = "cli"
    code = cli_main(
        ["fuse", str(workdir / "a"), str(workdir / "b"), "--out", str(workdir / "fused"), "--data",
         str(workdir / "align"), "--batch-size", str(BATCH_SIZE), "--push-to-hub", "ns/fused"]
    )  # fmt: skip
    # the quality options (repair and refinement run on every process over all the data): the same weights
    phase = "quality"
    config = FusionConfig(repair="all", refine_steps=4, batch_size=BATCH_SIZE)
    quality = fuse(parents, data=data, config=config, progress=False)
    if state.is_main_process:
        save_file(dict(quality.state_dict()), workdir / "quality.safetensors")
    # quality="best": refinement on every process, the closed form's Gram statistics summed over the processes
    best = fuse_with_diagnostics(parents, data=data, config=BEST_CONFIG, progress=False)
    save_file(dict(best.model.state_dict()), workdir / f"best{state.process_index}.safetensors")
    record = dict(
        num_processes=state.num_processes,
        process_index=state.process_index,
        backend=state.backend,
        samples=samples,
        saves=saves,
        cli_exit=code,
        choice=best.choice.to_dict(),
    )
    (workdir / f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
