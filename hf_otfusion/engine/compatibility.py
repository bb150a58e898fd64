"""Checks that the parents can be fused, run before any statistics or solve so that bad input fails early."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..errors import (
    DepthMismatchError,
    IncompatibleModelsError,
    LabelSetMismatchError,
    ModelTypeMismatchError,
    NonFiniteWeightsError,
    VocabularyMismatchError,
)
from .plan import FusionPlan


def check_same_model_type(models: list[PreTrainedModel]) -> None:
    """Raises `ModelTypeMismatchError` unless every parent has the anchor's `model_type`."""
    types = [model.config.model_type for model in models]
    if len(set(types)) > 1:
        raise ModelTypeMismatchError(
            f"Parents have different model types {types}. OT fusion aligns models of one architecture "
            "family; fuse checkpoints that share a model_type.",
            model_types=types,
        )


def check_compatible(models: list[PreTrainedModel], plans: list[FusionPlan], anchor: int) -> None:
    """Raises a specific `IncompatibleModelsError` for the first reason the parents cannot be fused."""
    check_same_model_type(models)
    reference, ref_plan = models[anchor].config, plans[anchor]
    for k, (model, plan) in enumerate(zip(models, plans, strict=True)):
        config = model.config
        if plan.num_layers != ref_plan.num_layers:
            raise DepthMismatchError(
                f"Parent {k} has {plan.num_layers} layers but the anchor (parent {anchor}) has "
                f"{ref_plan.num_layers}. Layer i is fused with layer i, so parents need the same depth; "
                "fuse parents of equal depth.",
                depths=(plan.num_layers, ref_plan.num_layers),
                parent=k,
            )
        vocab, ref_vocab = getattr(config, "vocab_size", None), getattr(reference, "vocab_size", None)
        if vocab != ref_vocab:
            raise VocabularyMismatchError(
                f"Parent {k} has a vocabulary of {vocab} tokens but the anchor has {ref_vocab}. Embedding "
                "rows only mean the same token under the same tokenizer; fuse parents that share one.",
                vocab_sizes=(vocab, ref_vocab),
                parent=k,
            )
        missing = sorted(set(ref_plan.parameters) ^ set(plan.parameters))
        if missing:
            raise IncompatibleModelsError(
                f"Parent {k} ({plan.architecture}) and the anchor ({ref_plan.architecture}) differ in "
                f"parameters {missing[:5]}; load every parent with the same model class.",
                parent=k,
            )
        labels, ref_labels = _labels(config), _labels(reference)
        if labels != ref_labels:
            raise LabelSetMismatchError(
                f"Parent {k} predicts labels {labels} but the anchor predicts {ref_labels}. Class logits are "
                "averaged row by row, so label sets and orders must match; remap the classifier rows (and "
                "id2label) of one parent, or fuse the base models and train a new head. Parents fine-tuned for "
                "different tasks from one base keep their own heads with a multi-task merge: "
                "hf_otfusion.merge_tasks(parents, config) (CLI: otfusion-hub fuse ... --multi-task).",
                label_sets=(labels, ref_labels),
                parent=k,
            )
        ref_params, params = dict(models[anchor].named_parameters()), dict(model.named_parameters())
        for name, axes in ref_plan.parameters.items():
            for dim, axis in enumerate(axes):
                if axis is None and params[name].shape[dim] != ref_params[name].shape[dim]:
                    raise IncompatibleModelsError(
                        f"{name} axis {dim} has {params[name].shape[dim]} entries in parent {k} but "
                        f"{ref_params[name].shape[dim]} in the anchor, and that axis is not aligned; the "
                        "parents' configs must agree on it.",
                        parent=k,
                    )


def check_finite(models: list[PreTrainedModel], indices: list[int] | None = None) -> None:
    """Raises `NonFiniteWeightsError` naming the first parameter with NaN or inf (parents numbered by `indices`)."""
    for k, model in zip(range(len(models)) if indices is None else indices, models, strict=True):
        name = first_non_finite(model.named_parameters())
        if name is not None:
            raise NonFiniteWeightsError(
                f"Parent {k} has NaN or infinite values in {name}. The checkpoint is corrupt or its "
                "training diverged; re-export it or leave it out of the fusion.",
                tensor=name,
            )


def first_non_finite(named_tensors) -> str | None:
    """The name of the first floating-point tensor of `(name, tensor)` pairs holding NaN or inf, else None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _labels(config) -> dict[int, str]:
    return {int(key): str(value) for key, value in (config.id2label or {}).items()}


def same_widths(plans: list[FusionPlan]) -> bool:
    """Whether every parent has the first one's number of units in every space, hence tensors of one shape.

    Unaligned axes (vocabulary, labels, positions) are equal already once `check_compatible` has passed.
    """
    return all(plan.spaces[name].size == space.size for plan in plans for name, space in plans[0].spaces.items())


def check_same_widths(plans: list[FusionPlan], anchor: int, method: str, among: list[int] | None = None) -> None:
    """Raises `IncompatibleModelsError` when a method that averages tensors as they are meets other widths.

    Args:
        among: the parents that are averaged as they are (default: all); aligned ones may differ.
    """
    for k in range(len(plans)) if among is None else among:
        for name, space in plans[anchor].spaces.items():
            size = plans[k].spaces[name].size
            if size != space.size:
                raise IncompatibleModelsError(
                    f"Parent {k} has {size} units in space {name!r} but the anchor (parent {anchor}) has "
                    f"{space.size}: method={method!r} averages tensors as they are, which needs parents of one "
                    "shape. Use method='ot' (or align='ot' for the same-base methods), which aligns parents of "
                    "different widths onto the anchor's shape (or onto FusionConfig.target).",
                    parent=k,
                )
