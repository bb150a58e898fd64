"""`fuse`: the whole pipeline, spec -> plan -> statistics -> maps -> aligned parents -> weighted average."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from .align import align_tensor
from .compatibility import check_compatible, check_finite, check_same_model_type
from .config import FusionConfig
from .errors import EmptyAlignmentDataError, FusionError, UnsupportedArchitectureError
from .maps import SpaceDiagnostics, compute_maps, per_hook_spaces
from .plan import FusionPlan, resolve_plan
from .spec import AlignmentSpec, load_spec
from .statistics import collect_statistics, statistics_keys
from .transport import TransportMap

logger = logging.getLogger(__name__)

ModelOrPath = PreTrainedModel | str | Path


@dataclass
class FusionResult:
    """The fused model with what it took to get there.

    Attributes:
        model: the fused model, an instance of the anchor's class with the anchor's config.
        config: the `FusionConfig` used.
        maps: `maps[k][space]`, the transport map of each space of parent k onto the anchor (empty for the
            anchor and for `vanilla`).
        diagnostics: one entry per solved space and parent (cost, entropy, softness, time).
        timings: wall seconds per stage (`plan`, `statistics`, `maps`, `apply` = align and average).
    """

    model: PreTrainedModel
    config: FusionConfig
    maps: dict[int, dict[str, TransportMap]] = field(default_factory=dict)
    diagnostics: list[SpaceDiagnostics] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table of the per-space diagnostics."""
        lines = [f"{'parent':>6} {'space':<12} {'units':>11} {'source':<11} {'cost':>10} {'softness':>8}"]
        for d in self.diagnostics:
            units = f"{d.units[0]}x{d.units[1]}"
            lines.append(
                f"{d.parent:>6} {d.space:<12} {units:>11} {d.cost_source:<11} {d.transport_cost:>10.4g} "
                f"{d.softness:>8.3f}"
            )
        return "\n".join(lines)


def fuse(
    models: list[ModelOrPath],
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
) -> PreTrainedModel:
    """Fuses two or more parents into one model of the anchor's class; see `fuse_with_diagnostics`."""
    return fuse_with_diagnostics(models, data, config, spec=spec, progress=progress).model


def fuse_with_diagnostics(
    models: list[ModelOrPath],
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
) -> FusionResult:
    """Aligns every parent onto the anchor with optimal transport, then averages in the anchor's basis.

    Args:
        models: parents, as loaded models or local/Hub checkpoints (loaded with safetensors only).
        data: alignment data for `cost="activations"`: a `datasets.Dataset` with the model's input
            columns (`input_ids`, `attention_mask`, `pixel_values`, ...), a DataLoader or an iterable of
            batch dicts. Not needed for `cost="weights"` or `method="vanilla"`.
        config: the fusion choices; defaults to `FusionConfig()`.
        spec: an alignment spec (object, shipped `model_type` name or YAML path); defaults to the spec of the
            parents' `model_type`.
        progress: show progress bars.

    Returns:
        A `FusionResult` whose `model` is a normal `PreTrainedModel` (save it with `save_pretrained`).

    Raises:
        FusionError: and its subclasses for incompatible parents, unsupported architectures, non-finite
            weights or missing alignment data; each message says what to do.
    """
    config = config or FusionConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    parents = [load_parent(model) for model in models]
    if len(parents) < 2:
        raise FusionError(f"Fusion needs at least 2 parents, got {len(parents)}.")
    if not 0 <= config.anchor < len(parents):
        raise FusionError(f"FusionConfig.anchor={config.anchor} is out of range for {len(parents)} parents.")
    weights = config.normalised_weights(len(parents))
    check_same_model_type(parents)
    if isinstance(spec, str | Path):
        spec = load_spec(spec)
    plans = [resolve_plan(parent, spec) for parent in parents]
    check_compatible(parents, plans, config.anchor)
    check_finite(parents)
    needs_data = config.method == "ot" and config.cost == "activations"
    if needs_data and data is None:
        raise EmptyAlignmentDataError(
            "cost='activations' needs alignment data: pass data=<datasets.Dataset or DataLoader of model "
            "inputs>, or use FusionConfig(cost='weights') for data-free alignment."
        )
    timings["plan"] = time.perf_counter() - started

    anchor = config.anchor
    params = [{name: p.detach() for name, p in parent.named_parameters()} for parent in parents]
    result = FusionResult(model=parents[anchor], config=config, timings=timings)
    if config.method == "ot":
        stats = None
        if needs_data:
            started = time.perf_counter()
            keys = statistics_keys(plans[anchor], per_hook_spaces(plans[anchor], config))
            stats = collect_statistics(
                parents, plans, data, anchor=anchor, keys=keys, tokens=config.tokens, batch_size=config.batch_size,
                num_samples=config.num_samples, progress=progress,
            )  # fmt: skip
            timings["statistics"] = time.perf_counter() - started
        started = time.perf_counter()
        for k in range(len(parents)):
            if k != anchor:
                result.maps[k], diagnostics = compute_maps(
                    k, plans[k], plans[anchor], params[k], params[anchor], stats[k] if stats else None, config, progress
                )
                result.diagnostics.extend(diagnostics)
        del stats  # the Gram matrices are not needed once the maps exist; free them before building the model
        timings["maps"] = time.perf_counter() - started

    started = time.perf_counter()
    result.model = _build_fused_model(parents[anchor], params, plans, result.maps, weights)
    timings["apply"] = time.perf_counter() - started
    return result


def load_parent(model: ModelOrPath) -> PreTrainedModel:
    """A parent as a model: loaded models pass through; paths and Hub ids load as their saved class."""
    if isinstance(model, PreTrainedModel):
        return model
    config = AutoConfig.from_pretrained(str(model))
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise UnsupportedArchitectureError(
            f"{model} names architecture {architecture!r} in its config.json, which transformers does not "
            "provide; load the model yourself and pass the object."
        )
    return model_class.from_pretrained(str(model), use_safetensors=True)


def _build_fused_model(
    anchor_model: PreTrainedModel,
    params: list[dict[str, torch.Tensor]],
    plans: list[FusionPlan],
    maps: dict[int, dict[str, TransportMap]],
    weights: list[float],
) -> PreTrainedModel:
    """A copy of the anchor whose every parameter is the weighted mix of the parents' aligned tensors.

    Parents are aligned one tensor at a time while mixing, so the peak memory is the parents plus the fused
    copy, not a second aligned copy of every parent.
    """
    fused = copy.deepcopy(anchor_model)
    with torch.no_grad():
        for name, param in fused.named_parameters():
            mixed = torch.zeros(param.shape, dtype=torch.float64)
            for k, weight in enumerate(weights):
                tensor = params[k][name]
                aligned = align_tensor(tensor, plans[k].parameters[name], maps[k]) if k in maps else tensor.double()
                mixed += weight * aligned
            param.copy_(mixed.to(param.dtype))
    return fused
