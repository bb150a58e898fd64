"""Pre-flight: every check a fusion job can make before downloading a weight.

The order matters for users with large parents on slow links: every revision is first pinned to its commit SHA,
then only `config.json` and the safetensors headers are read (see `hub.parents.resolve_parent`), and the parents
are checked with the same `engine.prepare` step that `fuse` runs, on meta-device models built from those
configs. Only when all of that passes are the weights downloaded, pinned to the SHAs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import PreTrainedModel

from ..checkpoints import init_kwargs, weightless_model
from ..config import FusionConfig
from ..data import DataSource
from ..engine.plan import FusionPlan
from ..engine.prepare import check_parent_count, prepare
from ..engine.spec import available_specs
from ..errors import CorruptCheckpointError, UnsupportedArchitectureError
from ..hub.parents import Parent, model_class_of, resolve_parent

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    """What pre-flight learned: the pinned parents (and base), their plans, the resolved data sources.

    Attributes:
        parents: every parent, pinned to a commit, its config and weight headers read.
        anchor: the anchor's index.
        plans: each parent's resolved plan, from its meta-device model.
        download_bytes: the weight bytes still to download.
        base: the pinned task-arithmetic base, if any.
        alignment_data / eval_data: the resolved data sources (split chosen), if any; with several (a multi-task
            run: one per parent, one per task), the first.
        data_sources / eval_sources: every resolved alignment / evaluation source, in the parents' order.
    """

    parents: list[Parent]
    anchor: int
    plans: list[FusionPlan]
    download_bytes: int
    base: Parent | None = None
    alignment_data: DataSource | None = None
    eval_data: DataSource | None = None
    data_sources: list[DataSource] = field(default_factory=list)
    eval_sources: list[DataSource] = field(default_factory=list)

    @property
    def anchor_plan(self) -> FusionPlan:
        """The anchor's plan: the fused model's shape."""
        return self.plans[self.anchor]

    def describe(self, config: FusionConfig, out: Path, push_to_hub: str | None) -> str:
        """Text for `--dry-run`: what would be downloaded, fused, written and pushed."""
        lines = [self._describe_parents(config)]
        if self.base is not None:
            lines.append(f"Task-arithmetic base: {self.base.pinned}")
        for kind, sources in (("Alignment data", self.data_sources), ("Evaluation data", self.eval_sources)):
            for k, source in enumerate(sources):
                label = f"{kind} {k}" if len(sources) > 1 else kind
                cap = source.num_samples if source.num_samples is not None else "all"
                split = source.split or "none (a single saved Dataset)"
                lines.append(f"{label}: {source.pinned} ({source.kind}), split {split}, rows {cap}")
        lines.append(f"Output: {out}" + (f", then pushed to {push_to_hub}" if push_to_hub else ""))
        return "\n".join(lines)

    def _describe_parents(self, config: FusionConfig) -> str:
        anchor = self.parents[self.anchor]
        lines = ["Parents (pinned):"]
        for k, parent in enumerate(self.parents):
            role = "anchor" if k == self.anchor else f"parent {k}"
            params = f"{parent.num_parameters:,} params" if parent.num_parameters is not None else "pickle weights"
            files = ", ".join(f"{w.name} ({w.size:,} B)" for w in parent.weight_files)
            lines.append(f"  [{role}] {parent.pinned}  {parent.config.get('architectures', ['?'])[0]}, {params}")
            lines.append(f"           {files}")
        groups: dict[str, list[int]] = {}
        for space in self.anchor_plan.spaces.values():
            groups.setdefault(space.name.split(".")[0], []).append(space.size)
        spaces = ", ".join(
            f"{kind} {len(sizes)} x {'/'.join(str(v) for v in sorted(set(sizes)))}" for kind, sizes in groups.items()
        )
        plan = self.anchor_plan
        lines += [
            f"Architecture: {plan.architecture} ({plan.model_type}, {plan.num_layers} layers); "
            f"the fused model takes the anchor's config ({anchor.name}).",
            f"Spaces to align: {spaces}",
            f"Fusion: method={config.method} cost={config.cost} solver={config.solver} reg={config.reg} "
            f"residual={config.residual} heads={config.heads} weights={config.normalised_weights(len(self.parents))}",
            f"To download: {self.download_bytes:,} bytes of weights (nothing downloaded yet).",
        ]
        return "\n".join(lines)


def preflight(
    sources: list[str],
    config: FusionConfig,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    multi_task: bool = False,
) -> Preflight:
    """Resolves every parent and checks they can be fused, from configs and headers only (no weights fetched):
    `resolve_parents`, then `check_parents`.

    Raises:
        FusionError: any error of those two.
    """
    parents, models = resolve_parents(sources, config, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return check_parents(parents, models, config, multi_task=multi_task)


def resolve_parents(
    sources: list[str], config: FusionConfig, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[list[Parent], list[PreTrainedModel]]:
    """Every parent pinned and described (`resolve_parent`), with its meta-device model, built from its config.

    Each parent's safetensors headers are compared with its full meta model (`check_tensors`), so a missing or
    misshapen weight fails here, not when the downloaded weights are loaded.

    Raises:
        FusionError: too few parents for `config` (before the Hub is contacted), any `resolve_parent` error, an
            `UnsupportedArchitectureError`, or a `CorruptCheckpointError` from `check_tensors`.
    """
    check_parent_count(len(sources), config)  # before the Hub is contacted
    parents = [resolve_parent(s, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for s in sources]
    models = [meta_model(parent, trust_remote_code) for parent in parents]
    for parent, model in zip(parents, models, strict=True):
        check_tensors(parent, model)
    return parents, models


def check_parents(
    parents: list[Parent], models: list[PreTrainedModel], config: FusionConfig, *, multi_task: bool = False
) -> Preflight:
    """Checks that the resolved parents can be fused, on their meta models: `prepare` resolves the spec and runs
    `check_compatible`, so depth, vocabulary, label set and unaligned-shape mismatches surface before any download.

    With `multi_task`, the parents' encoders are checked (`multitask.encoder_view`): their heads and label sets
    may differ. A `config.target` is checked on the anchor's meta model (`methods.target.check_target`), and other
    widths under a method that averages tensors as they are are refused by `prepare`. The models are not changed,
    so a caller may check them again in the other mode.

    Raises:
        FusionError: an `IncompatibleModelsError` (`LabelSetMismatchError` for different label sets) or
            `UnsupportedArchitectureError` naming the parent and the fix, or a `TargetShapeError`.
    """
    if multi_task:
        from ..multitask import encoder_view

        models = [encoder_view(model, k) for k, model in enumerate(models)]
    plans = prepare(models, config).plans
    if config.target is not None:  # a wider target or a bad head split fails now, not after the download
        from ..methods.target import check_target

        check_target(models[config.anchor], config.target)
    download = sum(w.size for p in parents if p.on_hub for w in p.weight_files)
    return Preflight(parents=parents, anchor=config.anchor, plans=plans, download_bytes=download)


def meta_model(parent: Parent, trust_remote_code: bool) -> PreTrainedModel:
    """The parent's model with its config's shapes and no storage: enough to resolve the spec and compare shapes."""
    model_type = parent.config.get("model_type")
    if model_type not in available_specs():
        raise UnsupportedArchitectureError(
            f"Parent {parent.name} is a {model_type!r} model; fusion specs exist for {available_specs()}. Add a spec "
            "file for this model type (see hf_otfusion/engine/specs).",
            model_type=model_type,
        )
    config = transformers.AutoConfig.for_model(**parent.config)
    model_class = model_class_of(parent, trust_remote_code)
    return weightless_model(model_class, config, **init_kwargs(model_class, list(parent.tensors)))


def check_tensors(parent: Parent, model: PreTrainedModel) -> None:
    """The safetensors headers hold every weight `model` needs, each with its shape, as loading would find them.

    Compared like for like with what `from_pretrained` does: the checkpoint's names are renamed by transformers'
    conversion rules and base-model prefix (a bare `BertModel` file under `bert.`), tied copies (an MLM decoder
    tied to the word embeddings) need only one side saved, and non-persistent buffers are neither expected nor
    refused (older files hold `position_ids`). Other tensors the model has no place for are named with the
    missing ones, and alone are only a warning, as transformers ignores them (a file saved from
    `BertForPreTraining` under a `BertForMaskedLM` config holds a next-sentence head).

    Raises:
        CorruptCheckpointError: tensors are missing or have another shape than the config gives them.
    """
    if parent.weight_format != "safetensors" or not parent.tensors:
        return
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    saved, converted = _renamed(parent.tensors, model, expected)
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    pairs = tied.items() if isinstance(tied, dict) else [(name,) for name in tied]  # a list: the tied copies
    for pair in pairs:  # one side of a tie saved is both sides loaded (the other shares its tensor)
        present = [name for name in pair if name in saved]
        for name in pair:
            if present and name not in saved and name in expected:
                saved[name] = expected[name]
    missing = [] if converted else sorted(set(expected) - set(saved))
    shapes = sorted(f"{n} {list(saved[n])} (expected {list(expected[n])})"
                    for n in set(expected) & set(saved) if saved[n] != expected[n] and n not in converted)  # fmt: skip
    buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones (position_ids) some files hold
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(n for n in set(saved) - set(expected) - buffers if not any(p.search(n) for p in ignored))
    if missing or shapes:
        parts = [f"{label}: {len(names)} ({_first(names)})" for label, names in
                 (("missing", missing), ("wrong shape", shapes), ("unexpected", unexpected)) if names]  # fmt: skip
        raise CorruptCheckpointError(
            f"Parent {parent.name} does not hold the weights its config describes ({model.__class__.__name__}): "
            f"{'; '.join(parts)}. The checkpoint is incomplete or was saved from another class or config; re-export "
            "it with save_pretrained.",
            path=parent.pinned,
            source=parent.source,
        )
    if unexpected:
        logger.warning("Parent %s holds %d tensor(s) %s has no place for, ignored: %s", parent.name,
                       len(unexpected), model.__class__.__name__, _first(unexpected))  # fmt: skip


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f", ... {len(names) - count} more" if len(names) > count else "")


def _renamed(
    tensors: dict[str, tuple[int, ...]], model: PreTrainedModel, expected: dict
) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The checkpoint's tensor names as transformers would load them, and the names a converter produced.

    A converter (e.g. one fused qkv tensor split into three) changes shapes and counts, so those names are
    exempt from the shape and completeness checks.
    """
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # another transformers: only the base-model prefix
        rename_source_key, renamings, converters = None, [], []
    renamed: dict[str, tuple[int, ...]] = {}
    converted: set[str] = set()
    for name, shape in tensors.items():
        if rename_source_key is not None:
            new, pattern = rename_source_key(name, renamings, converters, prefix, expected)
        else:
            new, pattern = _with_prefix(name, prefix, expected), None
        renamed[new] = shape
        if pattern is not None:
            converted.add(new)
    return renamed, converted


def _with_prefix(name: str, prefix: str | None, expected: dict) -> str:
    if prefix and name.startswith(f"{prefix}.") and name[len(prefix) + 1 :] in expected:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in expected:
        return f"{prefix}.{name}"
    return name
