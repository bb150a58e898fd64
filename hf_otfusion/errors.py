"""Specific exceptions, each with a message that names the problem and the fix.

They all derive from `FusionError` (a `ValueError`), so callers can catch one class for any bad input. Like
`huggingface_hub.errors`, each class also derives from the builtin that fits (`FileNotFoundError` for a missing
parent, `LookupError` for an unknown revision, `OSError` for an unreadable checkpoint or a failed upload, ...), so
code that catches the builtin catches it too, and carries the offending values as keyword-only attributes
(listed under `Attributes:`; each is `None` when the raise site did not know it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


class FusionError(ValueError):
    """Base class for every error hf_otfusion raises on bad input."""


class InvalidConfigError(FusionError):
    """A `FusionConfig` / `FinetuneConfig` field (or a run option) has a value out of range, of the wrong type,
    unknown, or one that contradicts another field.

    Attributes:
        field: the field (or option) at fault, e.g. `"reg"` or `"weights[0]"`; for unknown keys, the keys.
        value: the value given for it.
    """

    def __init__(self, message: str, *, field: str | list[str] | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class SpecError(FusionError):
    """An alignment spec is malformed: unknown keys, bad axis bindings, undeclared spaces.

    Attributes:
        spec: the spec at fault: its file or model type.
        key: the space, parameter, module or spec key at fault.
    """

    def __init__(self, message: str, *, spec: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec
        self.key = key


class UnsupportedArchitectureError(FusionError, LookupError):
    """No alignment spec is registered for the model's `model_type`, or transformers lacks its architecture.

    Attributes:
        model_type: the model's `model_type`.
        architecture: the model class named in its config, where that is what is missing.
    """

    def __init__(self, message: str, *, model_type: str | None = None, architecture: str | None = None) -> None:
        super().__init__(message)
        self.model_type = model_type
        self.architecture = architecture


class UncoveredParameterError(FusionError):
    """Resolving a spec against a model left a parameter unbound, or bound it twice.

    Attributes:
        parameters: the names of the parameters left unbound (or bound twice).
    """

    def __init__(self, message: str, *, parameters: list[str] | None = None) -> None:
        super().__init__(message)
        self.parameters = parameters


class IncompatibleModelsError(FusionError):
    """The parents cannot be fused into one model.

    Attributes:
        parent: the index of the parent that differs from the anchor.
    """

    def __init__(self, message: str, *, parent: int | None = None) -> None:
        super().__init__(message)
        self.parent = parent


class ModelTypeMismatchError(IncompatibleModelsError):
    """Parents have different `model_type`s.

    Attributes:
        model_types: every parent's `model_type`, in order.
        parent: the index of the first parent whose type differs, when known.
    """

    def __init__(self, message: str, *, model_types: list[str] | None = None, parent: int | None = None) -> None:
        super().__init__(message, parent=parent)
        self.model_types = model_types


class DepthMismatchError(IncompatibleModelsError):
    """Parents have different numbers of layers.

    Attributes:
        depths: `(parent's, anchor's)` numbers of layers.
        parent: the index of the parent.
    """

    def __init__(self, message: str, *, depths: tuple[int, int] | None = None, parent: int | None = None) -> None:
        super().__init__(message, parent=parent)
        self.depths = depths


class VocabularyMismatchError(IncompatibleModelsError):
    """Parents have different vocabularies, so their embedding rows mean different tokens.

    Attributes:
        vocab_sizes: `(parent's, anchor's)` vocabulary sizes.
        parent: the index of the parent.
    """

    def __init__(self, message: str, *, vocab_sizes: tuple | None = None, parent: int | None = None) -> None:
        super().__init__(message, parent=parent)
        self.vocab_sizes = vocab_sizes


class LabelSetMismatchError(IncompatibleModelsError):
    """Parents (or a parent and its data) predict different label sets, so their class logits cannot be averaged.

    Attributes:
        label_sets: `(parent's, anchor's)` label lists, or `(the data's unknown labels, the model's labels)`.
        parent: the index of the parent, when two parents differ.
    """

    def __init__(self, message: str, *, label_sets: tuple | None = None, parent: int | None = None) -> None:
        super().__init__(message, parent=parent)
        self.label_sets = label_sets


class TargetShapeError(FusionError):
    """A `target` shape is not a compression of the anchor: unknown config key, a wider space, bad head split.

    Attributes:
        key: the `target` config key at fault, when one is.
        target: the whole `target` mapping.
    """

    def __init__(self, message: str, *, key: str | None = None, target: dict | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.target = target


class NonFiniteWeightsError(FusionError, ArithmeticError):
    """A parent, or the fused result, has NaN or infinite weights; nothing is written or pushed.

    Attributes:
        tensor: the name of the first tensor found with NaN or inf.
    """

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class TransportError(FusionError):
    """The optimal-transport solver was given inputs it cannot solve: an unknown solver or activation cost,
    unequal widths for an orthogonal map, or neither a plan nor a permutation.

    Attributes:
        solver: the solver (or activation cost) name at fault.
        widths: the `(n_a, n_b)` numbers of units, where they do not fit.
    """

    def __init__(self, message: str, *, solver: str | None = None, widths: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.solver = solver
        self.widths = widths


class EmptyAlignmentDataError(FusionError):
    """Activation-based alignment was asked for, but there is no data or it yielded no usable token."""


class DataSourceError(FusionError):
    """Alignment or evaluation data cannot be found, read, or turned into model inputs.

    Attributes:
        source: the data source (path or Hub id) at fault.
        column: the column at fault, where one is.
    """

    def __init__(self, message: str, *, source: str | None = None, column: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.column = column


class MissingDependencyError(DataSourceError, ImportError):
    """A package the data path needs is not installed (Pillow for image processors).

    Attributes:
        package: the pip name of the missing package.
        source: the model directory whose processor needs it.
    """

    def __init__(self, message: str, *, package: str | None = None, source: str | None = None) -> None:
        super().__init__(message, source=source)
        self.package = package
        self.name = package  # ImportError's own attribute


class ParentNotFoundError(FusionError, FileNotFoundError):
    """A parent is neither an existing local checkpoint directory nor a repository on the Hub.

    Attributes:
        source: the parent as given (path or Hub id).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class UnknownRevisionError(FusionError, LookupError):
    """A parent's or data set's `@revision` names no branch, tag or commit of its repository.

    Attributes:
        source: the repository id.
        revision: the revision asked for.
    """

    def __init__(self, message: str, *, source: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.revision = revision


class CorruptCheckpointError(FusionError, OSError):
    """A weight file is unreadable, truncated, or does not hold the tensors its config describes.

    Attributes:
        path: the file (or checkpoint directory) at fault.
        source: the parent as given (path or Hub id).
    """

    def __init__(self, message: str, *, path=None, source: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.source = source


class UnsafeCheckpointError(FusionError, PermissionError):
    """Loading a checkpoint would run code: pickle weights or remote code, refused unless explicitly allowed.

    Attributes:
        path: the checkpoint (directory or weight file) at fault.
        reason: `"pickle"` or `"remote-code"`.
    """

    def __init__(self, message: str, *, path=None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


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
    directory (or one inside or around it), a file, a symbolic link, or a place that cannot be written.

    Attributes:
        path: the output path, resolved.
    """


class PushError(FusionError, OSError):
    """Uploading a finished output directory to the Hub failed; the local output is kept.

    Attributes:
        retry: the `otfusion-hub push` command line that uploads the directory again.
        repo_id: the Hub repository pushed to.
        folder: the local directory that was (to be) uploaded.
    """

    def __init__(self, message: str, *, retry: str | None = None, repo_id: str | None = None, folder=None) -> None:
        super().__init__(message)
        self.retry = retry
        self.repo_id = repo_id
        self.folder = folder


class TrainingDataError(FusionError):
    """Finetuning or evaluation data does not fit the model: missing input columns or labels, unknown labels.

    Attributes:
        columns: the data's columns, where a column is missing.
        labels: the offending labels: their `(low, high)` span, or the data's label names.
    """

    def __init__(self, message: str, *, columns: list[str] | None = None, labels: Any = None) -> None:
        super().__init__(message)
        self.columns = columns
        self.labels = labels


class MetricInputError(FusionError):
    """A shipped metric was computed on inputs it cannot score: mismatched shapes, no predictions, unknown average.

    Attributes:
        metric: the metric's name.
        value: the offending value (the shapes, or the `average` option).
    """

    def __init__(self, message: str, *, metric: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.metric = metric
        self.value = value


class UnsupportedTaskError(FusionError, TypeError):
    """The model has no head that hf_otfusion can finetune or evaluate (sequence or image classification).

    Attributes:
        model_class: the model's class name.
    """

    def __init__(self, message: str, *, model_class: str | None = None) -> None:
        super().__init__(message)
        self.model_class = model_class


class DeviceUnavailableError(FusionError, RuntimeError):
    """The requested device (a CUDA GPU) is not available to torch in this process.

    Attributes:
        device: the device asked for, as given.
    """

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device


class UnsafeHostError(FusionError):
    """The local Hub server was asked to bind a non-loopback address; it has no authentication.

    Attributes:
        host: the host asked for.
    """

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class HubServerStateError(FusionError, RuntimeError):
    """A local Hub server was started again after it was stopped, or served twice.

    Attributes:
        state: `"stopped"` or `"running"`.
    """

    def __init__(self, message: str, *, state: str | None = None) -> None:
        super().__init__(message)
        self.state = state
