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
    "Checkpoint": "checkpoints",
    "FusionResult": "fusion",
    "fuse": "fusion",
    "fuse_with_diagnostics": "fusion",
    "align_parents": "alignment",
    "merge_tasks": "multitask",
    "MultiTaskResult": "multitask",
    "FinetuneConfig": "train.finetune",
    "FinetuneResult": "train.finetune",
    "finetune": "train.finetune",
    "EvaluationTable": "train.evaluation",
    "evaluate_model": "train.evaluation",
    "evaluate_models": "train.evaluation",
    "load_metric": "train.metrics",
    "DataSource": "data",
    "load_dataset_source": "data",
    "encode_dataset": "data",
    "FuseJob": "job.fuse_job",
    "Provenance": "output.provenance",
    "render_card": "output.card",
    "push_folder": "hub.push",
    "ReadinessReport": "methods.readiness",
    "readiness_report": "methods.readiness",
    "GramStatistics": "methods.gram",
    "collect_gram_statistics": "methods.gram",
    "merge_parameters": "methods.same_base",
    "regmean_linear": "methods.same_base",
    "permute_model": "engine.permute",
    "compress": "methods.target",
    "random_permutations": "engine.permute",
    "FusionPlan": "engine.plan",
    "resolve_plan": "engine.plan",
    "AlignmentSpec": "engine.spec",
    "available_specs": "engine.spec",
    "load_spec": "engine.spec",
    "TransportMap": "engine.transport",
    "solve_transport": "engine.transport",
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
    "InvalidConfigError": "errors",
    "TransportError": "errors",
    "MetricInputError": "errors",
    "UnsafeHostError": "errors",
    "HubServerStateError": "errors",
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


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .alignment import align_parents
    from .checkpoints import Checkpoint
    from .config import FusionConfig
    from .data import DataSource, encode_dataset, load_dataset_source
    from .engine.permute import permute_model, random_permutations
    from .engine.plan import FusionPlan, resolve_plan
    from .engine.spec import AlignmentSpec, available_specs, load_spec
    from .engine.transport import TransportMap, solve_transport
    from .errors import (
        CorruptCheckpointError,
        DataSourceError,
        DepthMismatchError,
        DeviceUnavailableError,
        EmptyAlignmentDataError,
        FusionError,
        HubServerStateError,
        IncompatibleModelsError,
        InvalidConfigError,
        LabelSetMismatchError,
        MetricInputError,
        MissingDependencyError,
        ModelTypeMismatchError,
        NonFiniteWeightsError,
        OutputExistsError,
        ParentNotFoundError,
        PushError,
        SpecError,
        TargetShapeError,
        TrainingDataError,
        TransportError,
        UncoveredParameterError,
        UnknownRevisionError,
        UnsafeCheckpointError,
        UnsafeHostError,
        UnsafeOutputError,
        UnsupportedArchitectureError,
        UnsupportedTaskError,
        VocabularyMismatchError,
    )
    from .fusion import FusionResult, fuse, fuse_with_diagnostics
    from .hub.push import push_folder
    from .job.fuse_job import FuseJob
    from .methods.gram import GramStatistics, collect_gram_statistics
    from .methods.readiness import ReadinessReport, readiness_report
    from .methods.same_base import merge_parameters, regmean_linear
    from .methods.target import compress
    from .multitask import MultiTaskResult, merge_tasks
    from .output.card import render_card
    from .output.provenance import Provenance
    from .train.evaluation import EvaluationTable, evaluate_model, evaluate_models
    from .train.finetune import FinetuneConfig, FinetuneResult, finetune
    from .train.metrics import load_metric
