"""hf_otfusion: fuse independently trained Hugging Face transformers with optimal-transport alignment.

The public names below are imported on first use, so that `otfusion-hub --help` or the local Hub server
start without importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FusionConfig": "config",
    "fuse": "fusion",
    "fuse_with_diagnostics": "fusion",
    "FusionResult": "fusion",
    "align_parents": "alignment",
    "Checkpoint": "checkpoints",
    "FuseJob": "job.fuse_job",
    "run_job": "job.run",
    "push_folder": "hub.push",
    "readiness_report": "methods.readiness",
    "ReadinessReport": "methods.readiness",
    "compress": "methods.target",
    "merge_tasks": "multitask",
    "MultiTaskResult": "multitask",
    "finetune": "train.finetune",
    "FinetuneConfig": "train.config",
    "FinetuneResult": "train.finetune",
    "evaluate_model": "train.evaluation",
    "evaluate_models": "train.evaluation",
    "EvaluationTable": "train.evaluation",
    "load_spec": "engine.spec",
    "available_specs": "engine.spec",
    "AlignmentSpec": "engine.spec",
    "permute_model": "engine.permute",
    "random_permutations": "engine.permute",
    "FusionError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_otfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; tests/test_public_api.py keeps it equal to _EXPORTS
    from .alignment import align_parents
    from .checkpoints import Checkpoint
    from .config import FusionConfig
    from .engine.permute import permute_model, random_permutations
    from .engine.spec import AlignmentSpec, available_specs, load_spec
    from .errors import FusionError
    from .fusion import FusionResult, fuse, fuse_with_diagnostics
    from .hub.push import push_folder
    from .job.fuse_job import FuseJob
    from .job.run import run_job
    from .methods.readiness import ReadinessReport, readiness_report
    from .methods.target import compress
    from .multitask import MultiTaskResult, merge_tasks
    from .train.config import FinetuneConfig
    from .train.evaluation import EvaluationTable, evaluate_model, evaluate_models
    from .train.finetune import FinetuneResult, finetune
