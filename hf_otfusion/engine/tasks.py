"""What a model class is for, read from transformers' own auto tables rather than from class names or a list here.

`transformers.models.auto.modeling_auto` maps each `model_type` to its class for each task
(`MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["bert"] == "BertForSequenceClassification"`, ...). The task of
a class is the first table below that lists it for its `model_type`; a class listed in none (a bare encoder such
as `BertModel`) extracts features, as text or image features by the spec's `modality`. So a new architecture
needs no entry here: its spec file and transformers' tables say it all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import transformers
from transformers.models.auto import modeling_auto

from ..errors import SpecError, UnsupportedArchitectureError

# (transformers' table, Hub pipeline tag, the Auto class that loads it, whether it is a classifier)
_TABLES = (
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification", "AutoModelForImageClassification", True),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification", "AutoModelForSequenceClassification",
     True),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask", "AutoModelForMaskedLM", False),
)  # fmt: skip
_FEATURES = {"text": "feature-extraction", "image": "image-feature-extraction"}


@dataclass(frozen=True)
class Task:
    """The task of one model class: its Hub pipeline tag, the Auto class that loads it, whether it classifies."""

    pipeline_tag: str
    auto_class: str
    classifier: bool = False
    siblings: tuple[str, ...] = ()  # the classes transformers lists for the same task and model_type


def task_of(architecture: str, model_type: str) -> Task:
    """The task of `architecture` (a class name) of `model_type`, from transformers' `MODEL_FOR_*_MAPPING_NAMES`."""
    for table, tag, auto_class, classifier in _TABLES:
        listed = _names(getattr(modeling_auto, table, {}).get(model_type))
        if architecture in listed:
            return Task(tag, auto_class, classifier, listed)
    return Task(_FEATURES[modality_of(model_type)], "AutoModel")


def modality_of(model_type: str) -> str:
    """What models of `model_type` read (`text` or `image`), from its spec; `text` when no spec ships for it."""
    from .spec import load_spec

    try:
        return load_spec(model_type).modality
    except (UnsupportedArchitectureError, SpecError):
        return "text"


def takes_labels(model_class: type) -> bool:
    """Whether the class's forward computes a loss from `labels` (DeiT's distillation model, for one, does not)."""
    return "labels" in inspect.signature(model_class.forward).parameters


def trainable_sibling(architecture: str, model_type: str) -> str | None:
    """A class of the same task and model type that takes `labels`, to finetune a checkpoint whose class does not."""
    for name in task_of(architecture, model_type).siblings:
        model_class = getattr(transformers, name, None)
        if name != architecture and model_class is not None and takes_labels(model_class):
            return name
    return None


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
