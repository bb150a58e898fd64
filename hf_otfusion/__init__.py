"""hf_otfusion: fuse independently trained Hugging Face transformers with optimal-transport alignment.

The public names below are imported on first use, so that `otfusion-hub --help` or the local Hub server
start without importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FusionConfig": "config",
    "Checkpoint": "checkpoints",
    "FusionResult": "fusion",
    "fuse": "fusion",
    "fuse_with_diagnostics": "fusion",
    "FinetuneConfig": "finetune",
    "FinetuneResult": "finetune",
    "finetune": "finetune",
    "EvaluationTable": "evaluation",
    "evaluate_model": "evaluation",
    "evaluate_models": "evaluation",
    "load_metric": "metrics",
    "DataSource": "data",
    "load_dataset_source": "data",
    "encode_dataset": "data",
    "FuseJob": "pipeline",
    "Provenance": "provenance",
    "render_card": "card",
    "push_folder": "hub",
    "ReadinessReport": "readiness",
    "readiness_report": "readiness",
    "GramStatistics": "gram",
    "collect_gram_statistics": "gram",
    "merge_parameters": "merging",
    "regmean_linear": "merging",
    "permute_model": "permute",
    "compress": "target",
    "random_permutations": "permute",
    "FusionPlan": "plan",
    "resolve_plan": "plan",
    "AlignmentSpec": "spec",
    "available_specs": "spec",
    "load_spec": "spec",
    "TransportMap": "transport",
    "solve_transport": "transport",
    "FusionError": "errors",
    "SpecError": "errors",
    "UnsupportedArchitectureError": "errors",
    "UncoveredParameterError": "errors",
    "IncompatibleModelsError": "errors",
    "ModelTypeMismatchError": "errors",
    "DepthMismatchError": "errors",
    "VocabularyMismatchError": "errors",
    "LabelSetMismatchError": "errors",
    "NonFiniteWeightsError": "errors",
    "EmptyAlignmentDataError": "errors",
    "DeviceUnavailableError": "errors",
    "TargetShapeError": "errors",
    "DataSourceError": "errors",
    "MissingDependencyError": "errors",
    "ParentNotFoundError": "errors",
    "UnknownRevisionError": "errors",
    "CorruptCheckpointError": "errors",
    "UnsafeCheckpointError": "errors",
    "OutputExistsError": "errors",
    "UnsafeOutputError": "errors",
    "PushError": "errors",
    "TrainingDataError": "errors",
    "UnsupportedTaskError": "errors",
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


class _Package(types.ModuleType):
    """The `hf_otfusion` module, which keeps a public function bound when its namesake submodule is imported.

    Importing `hf_otfusion.finetune` (which `from hf_otfusion import FinetuneConfig` does first) makes Python set
    the package attribute `finetune` to that submodule, shadowing the exported function of the same name, so
    `from hf_otfusion import FinetuneConfig, finetune` would bind a module. Here, that attribute is the
    function instead; `from hf_otfusion.finetune import ...` still reads the submodule from `sys.modules`.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .card import render_card
    from .checkpoints import Checkpoint
    from .config import FusionConfig
    from .data import DataSource, encode_dataset, load_dataset_source
    from .errors import (
        CorruptCheckpointError,
        DataSourceError,
        DepthMismatchError,
        DeviceUnavailableError,
        EmptyAlignmentDataError,
        FusionError,
        IncompatibleModelsError,
        LabelSetMismatchError,
        MissingDependencyError,
        ModelTypeMismatchError,
        NonFiniteWeightsError,
        OutputExistsError,
        ParentNotFoundError,
        PushError,
        SpecError,
        TargetShapeError,
        TrainingDataError,
        UncoveredParameterError,
        UnknownRevisionError,
        UnsafeCheckpointError,
        UnsafeOutputError,
        UnsupportedArchitectureError,
        UnsupportedTaskError,
        VocabularyMismatchError,
    )
    from .evaluation import EvaluationTable, evaluate_model, evaluate_models
    from .finetune import FinetuneConfig, FinetuneResult, finetune
    from .fusion import FusionResult, fuse, fuse_with_diagnostics
    from .gram import GramStatistics, collect_gram_statistics
    from .hub import push_folder
    from .merging import merge_parameters, regmean_linear
    from .metrics import load_metric
    from .permute import permute_model, random_permutations
    from .pipeline import FuseJob
    from .plan import FusionPlan, resolve_plan
    from .provenance import Provenance
    from .readiness import ReadinessReport, readiness_report
    from .spec import AlignmentSpec, available_specs, load_spec
    from .target import compress
    from .transport import TransportMap, solve_transport
