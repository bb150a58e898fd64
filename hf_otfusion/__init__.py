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
    "FusionResult": "fusion",
    "fuse": "fusion",
    "fuse_with_diagnostics": "fusion",
    "permute_model": "permute",
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
    from .config import FusionConfig
    from .errors import (
        DepthMismatchError,
        EmptyAlignmentDataError,
        FusionError,
        IncompatibleModelsError,
        LabelSetMismatchError,
        ModelTypeMismatchError,
        NonFiniteWeightsError,
        SpecError,
        UncoveredParameterError,
        UnsupportedArchitectureError,
        VocabularyMismatchError,
    )
    from .fusion import FusionResult, fuse, fuse_with_diagnostics
    from .permute import permute_model, random_permutations
    from .plan import FusionPlan, resolve_plan
    from .spec import AlignmentSpec, available_specs, load_spec
    from .transport import TransportMap, solve_transport
