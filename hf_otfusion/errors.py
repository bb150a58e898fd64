"""Specific exceptions, each with a message that names the problem and the fix.

They all derive from `FusionError` (a `ValueError`), so callers can catch one class for any bad input.
"""

from __future__ import annotations


class FusionError(ValueError):
    """Base class for every error hf_otfusion raises on bad input."""


class SpecError(FusionError):
    """An alignment spec is malformed: unknown keys, bad axis bindings, undeclared spaces."""


class UnsupportedArchitectureError(FusionError):
    """No alignment spec is registered for the model's `model_type`."""


class UncoveredParameterError(FusionError):
    """Resolving a spec against a model left a parameter unbound, or bound it twice."""


class IncompatibleModelsError(FusionError):
    """The parents cannot be fused into one model."""


class ModelTypeMismatchError(IncompatibleModelsError):
    """Parents have different `model_type`s."""


class DepthMismatchError(IncompatibleModelsError):
    """Parents have different numbers of layers."""


class VocabularyMismatchError(IncompatibleModelsError):
    """Parents have different vocabularies, so their embedding rows mean different tokens."""


class LabelSetMismatchError(IncompatibleModelsError):
    """Parents predict different label sets, so their class logits cannot be averaged."""


class NonFiniteWeightsError(FusionError):
    """A parent has NaN or infinite weights."""


class EmptyAlignmentDataError(FusionError):
    """Activation-based alignment was asked for, but the data yielded no usable token."""
