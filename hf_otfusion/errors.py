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


class TargetShapeError(FusionError):
    """A `target` shape is not a compression of the anchor: unknown config key, a wider space, bad head split."""


class NonFiniteWeightsError(FusionError, ArithmeticError):
    """A parent, or the fused result, has NaN or infinite weights; nothing is written or pushed.

    Attributes:
        tensor: the name of the first tensor found with NaN or inf.
    """

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class EmptyAlignmentDataError(FusionError):
    """Activation-based alignment was asked for, but the data yielded no usable token."""


class DataSourceError(FusionError):
    """Alignment or evaluation data cannot be found, read, or turned into model inputs."""


class MissingDependencyError(DataSourceError, ImportError):
    """A package the data path needs is not installed (Pillow for image processors); `package` names it."""

    def __init__(self, message: str, package: str):
        super().__init__(message)
        self.package = package


class ParentNotFoundError(FusionError):
    """A parent is neither an existing local checkpoint directory nor a repository on the Hub."""


class UnknownRevisionError(FusionError):
    """A parent's or data set's `@revision` names no branch, tag or commit of its repository."""


class CorruptCheckpointError(FusionError):
    """A weight file is unreadable, truncated, or does not hold the tensors its config describes."""


class UnsafeCheckpointError(FusionError):
    """Loading a checkpoint would run code: pickle weights or remote code, refused unless explicitly allowed."""


class OutputExistsError(FusionError, FileExistsError):
    """The output directory exists and is not empty (and `overwrite` was not given).

    Attributes:
        path: the output path, resolved.
    """

    def __init__(self, message: str, *, path=None) -> None:
        super().__init__(message)
        self.path = path


class UnsafeOutputError(OutputExistsError):
    """Writing the output there could destroy files: the working or home directory or an ancestor, an input's
    directory (or one inside or around it), a file, a symbolic link, or a place that cannot be written."""


class PushError(FusionError):
    """Uploading a finished output directory to the Hub failed; the local output is kept.

    Attributes:
        retry: the `otfusion-hub push` command line that uploads the directory again.
    """

    def __init__(self, message: str, *, retry: str | None = None) -> None:
        super().__init__(message)
        self.retry = retry


class TrainingDataError(FusionError):
    """Finetuning or evaluation data does not fit the model: missing input columns or labels, unknown labels."""


class UnsupportedTaskError(FusionError):
    """The model has no head that hf_otfusion can finetune or evaluate (sequence or image classification)."""


class DeviceUnavailableError(FusionError):
    """The requested device (a CUDA GPU) is not available to torch in this process."""
